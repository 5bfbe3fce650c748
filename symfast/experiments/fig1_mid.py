"""Figure 1-mid: rotation symmetry + SGD noise -> low-rank matrix factorization.

Paper (Fig. 1 caption, Sec. 4.7, App. A.2): "Vanilla 200 dimensional matrix factorization trained with
SGD prefers lower-rank solutions when the gradient noise is strong due to the rotation symmetry. The
inset shows that the model always stays full-rank if we remove the rotation symmetry by introducing
residual connections."

Setting (App. A.2): online data, batch size 1, x ~ N(0, I_200), label y = mu x + (1 - mu) eps with
eps_i ~ N(0, 2/i) (the noise is strongest on the first coordinates), f(x) = W U x with W, U 200 x 200,
plain SGD without momentum or weight decay; the inset's model is f(x) = (I + W)(I + U) x. mu is swept:
small mu = weak signal, strong label (hence gradient) noise. The paper does not give the learning
rate, the number of steps, the initialization or how rank is counted; the choices are in
:func:`make_config` and recorded in the output.

Three models train on the same data stream at every mu:

* ``vanilla``   f = W U x, W, U ~ N(0, init^2 / d) (the double rotation symmetry W -> W R, U -> R^T U);
* ``residual``  f = (I + W)(I + U) x from W = U = 0 (the paper's inset);
* ``linear``    f = W x from W = 0: one matrix, no symmetry at all (a control the paper does not show).

The learning rate is swept too, at the noisiest mu (``lr_sweep``, reported, not judged): how much rank each
model loses depends on it. The rank of the residual model's raw parameter W is recorded over time next to the
rank of its learned map (I + W)(I + U).

Rank is the number of singular values of the learned map (W U, (I + W)(I + U), or W) above
``rank_tol``, taken as the largest value over the late snapshots of training (a direction counts as
lost only if it stays lost; see ``config["rank"]``); every final singular value is stored.

A word on the residual model, because the theory predicts something the caption does not say:
(I + W)(I + U) = A B with A = I + W, B = I + U, and SGD without weight decay is translation-equivariant (the gradient in W is the gradient in A). So
the residual model *is* the factorization A B started from A = B = I: the rotation symmetry
A -> A R, B -> R^T B is still there, only moved away from W = U = 0 (paper footnote 9). Its
stationary conditions (I + W) n = 0, n^T (I + U) = 0 can still absorb SGD. The run measures what
happens; the criterion is the paper's claim as stated.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import torch
from tqdm import tqdm

from .common import (
    apply_overrides,
    Criterion,
    deviation,
    new_figure,
    run_experiment,
    save_figure,
    verdict_color,
)

EXPERIMENT = "fig1-mid"
TITLE = "Figure 1-mid: low rank from rotation symmetry and SGD noise (200-d matrix factorization)"
CLAIM = (
    "Figure 1-mid: 'Vanilla 200 dimensional matrix factorization trained with SGD prefers lower-rank solutions "
    "when the gradient noise is strong due to the rotation symmetry. The inset shows that the model always "
    "stays full-rank if we remove the rotation symmetry by introducing residual connections.'"
)
CLAIM_SHORT = "matrix factorization W U loses rank under strong SGD noise; residual (I+W)(I+U) stays full rank"

MODELS = ("vanilla", "residual", "linear")

#: Criterion: vanilla loses at least this many ranks at the noisiest mu ...
MIN_RANK_LOSS = 5


def _criteria(d: int) -> list[Criterion]:
    return [
        Criterion("summary.vanilla_rank_loss_at_noisiest", ">=", MIN_RANK_LOSS,
                  f"vanilla W U loses >= {MIN_RANK_LOSS} of its {d} ranks at the noisiest mu"),
        Criterion("summary.vanilla_rank_drop_noisiest_vs_cleanest", ">=", MIN_RANK_LOSS,
                  "... and has lower rank there than at the cleanest mu (the rank falls with the noise)"),
        Criterion("summary.vanilla_all_finite", "==", True, "vanilla trains without diverging at every mu"),
        Criterion("summary.residual_min_rank", "==", d,
                  "the residual model (I + W)(I + U) stays full rank at every mu (the inset)"),
        Criterion("summary.residual_all_finite", "==", True, "the residual model trains without diverging at every mu"),
        Criterion("summary.linear_min_rank", "==", d,
                  "a single matrix W (no symmetry) reads full rank at every mu (the rank measure does not mistake "
                  "noise for collapse)", control=True),
    ]


def make_config(quick: bool = True, seed: int = 0, **overrides) -> dict:
    cfg = {
        "quick": quick,
        "seed": seed,
        "d": 200,
        "mus": [0.02, 0.03, 0.05, 0.1, 0.3] if quick else [0.02, 0.03, 0.05, 0.07, 0.1, 0.15, 0.2, 0.3, 0.5, 0.7],
        "steps": 50_000 if quick else 100_000,
        "lr": 0.006,
        "lr_sweep": [0.002, 0.003, 0.004],  # also trained at the noisiest mu; reported, not judged
        "init_scale": 0.3,
        "rank_tol": 1e-4,
        "persist_frac": 0.4,
        "also_tols": [1e-2, 1e-3, 1e-5, 1e-6],
        "snapshots": 10,
        "dtype": "float32",
        "batch_size": 1,
        "data": "online: x ~ N(0, I_d), y = mu x + (1 - mu) eps, eps_i ~ N(0, 2/i) (i = 1..d)",
        "loss": "1/2 |f(x) - y|^2",
        "optimizer": "plain SGD, batch size 1, no momentum, no weight decay, constant lr",
        "models": {
            "vanilla": "f = W U x; W, U ~ N(0, init_scale^2 / d) independently (same draw at every mu)",
            "residual": "f = (I + W)(I + U) x; W = U = 0 at start (the paper's inset)",
            "linear": "f = W x; W = 0 at start (no symmetry; control)",
        },
        "rank": "persistent rank: the largest, over the snapshots of the last persist_frac of training, number of "
        "singular values of the learned map above rank_tol (float64 SVD of the float32 map). A direction counts as "
        "lost only if it stays below rank_tol at every late snapshot: random near-singular moments of a noisy "
        "full-rank map (seen in the no-symmetry control) are not collapse",
        "lr_choice": "the largest lr of a coarse scan (0.003, 0.0045, 0.006, 0.008, 0.012) at which every model "
        "trains stably at every mu of the quick grid (the residual model diverges at 0.008 for mu = 0.02)",
    }
    apply_overrides(cfg, overrides)
    cfg["mus"] = sorted(float(m) for m in cfg["mus"])
    return cfg


# ------------------------------------------------------------------ training
def train(cfg: dict, progress: bool = True) -> dict:
    """SGD for all (model, mu) pairs at once; returns final maps and rank snapshots.

    The two factorized models are one batch of 2M matrices (vanilla rows first); the update is
    fused into ``baddbmm_`` (outer product and step in one pass over the 200 x 200 matrices).
    """
    d, steps = cfg["d"], cfg["steps"]
    # rows: every mu at lr, then the noisiest mu at each other lr of lr_sweep
    rows = sweep_rows(cfg)
    mus = torch.tensor([r[0] for r in rows], dtype=torch.float32)
    M = len(mus)
    lr = torch.tensor([r[1] for r in rows], dtype=torch.float32)
    lr2 = torch.cat([lr, lr]).view(2 * M, 1)
    g = torch.Generator().manual_seed(int(cfg["seed"]))
    W0 = torch.randn(d, d, generator=g, dtype=torch.float64) * cfg["init_scale"] / d**0.5
    U0 = torch.randn(d, d, generator=g, dtype=torch.float64) * cfg["init_scale"] / d**0.5
    W = torch.cat([W0.float().expand(M, d, d), torch.zeros(M, d, d)]).contiguous()  # (2M, d, d)
    U = torch.cat([U0.float().expand(M, d, d), torch.zeros(M, d, d)]).contiguous()
    res = torch.cat([torch.zeros(M), torch.ones(M)]).view(2 * M, 1)  # adds the identity for the residual rows
    L = torch.zeros(M, d, d)  # the linear control
    mu = torch.cat([mus, mus]).view(2 * M, 1)
    noise_std = (2.0 / torch.arange(1, d + 1, dtype=torch.float64)).sqrt().float()

    snap_every = max(1, steps // cfg["snapshots"])
    snaps = {"step": [], **{m: [] for m in MODELS}, "residual_parameter_W": []}
    chunk = 500
    with tqdm(total=steps, desc="fig1-mid SGD", unit="step", disable=not progress, leave=False) as bar:
        done = 0
        while done < steps:
            n = min(chunk, steps - done)
            X = torch.randn(n, d, generator=g)
            E = torch.randn(n, d, generator=g) * noise_std
            for t in range(n):
                x = X[t]
                y = mu * x + (1 - mu) * E[t]  # (2M, d)
                # Matrix-vector products written as row-vector @ matrix: that form hits the fast
                # CPU kernels for batched matrices (W @ h[..., None] takes a ~10x slower bmm path).
                h = torch.matmul(U, x) + res * x  # (I + U) x for the residual rows
                r = torch.matmul(h.unsqueeze(-2), W.mT).squeeze(-2) + res * h - y
                gu = torch.matmul(r.unsqueeze(-2), W).squeeze(-2) + res * r  # (I + W)^T r
                W.baddbmm_((lr2 * r).unsqueeze(-1), h.unsqueeze(-2), alpha=-1)
                U.baddbmm_((lr2 * gu).unsqueeze(-1), x.expand(2 * M, 1, d), alpha=-1)
                rl = torch.matmul(L, x) - y[:M]
                L.baddbmm_((lr.view(M, 1) * rl).unsqueeze(-1), x.expand(M, 1, d), alpha=-1)
                if (done + t + 1) % snap_every == 0:
                    sv = _singular_values(W, U, L)
                    snaps["step"].append(done + t + 1)
                    for m in MODELS:
                        snaps[m].append((sv[m] > cfg["rank_tol"]).sum(-1).tolist())
                    snaps["residual_parameter_W"].append(_param_rank(W[M:], cfg["rank_tol"]))
            done += n
            bar.update(n)
    return {"sv": _singular_values(W, U, L), "finite": _finite(W, U, L), "snapshots": snaps,
            "linear_param_rank_W_residual": _param_rank(W[M:], cfg["rank_tol"])}


def sweep_rows(cfg: dict) -> list[tuple[float, float]]:
    """(mu, lr) of every trained row: each mu at ``lr``, then the noisiest mu at each other lr of ``lr_sweep``."""
    return ([(mu, cfg["lr"]) for mu in cfg["mus"]]
            + [(cfg["mus"][0], lr) for lr in cfg["lr_sweep"] if lr != cfg["lr"]])


def _maps(W, U, L) -> dict:
    M = L.shape[0]
    eye = torch.eye(W.shape[-1])
    return {"vanilla": W[:M] @ U[:M], "residual": (eye + W[M:]) @ (eye + U[M:]), "linear": L}


def _singular_values(W, U, L) -> dict:
    out = {}
    for k, P in _maps(W, U, L).items():
        P = P.double()
        ok = torch.isfinite(P).flatten(1).all(-1)
        sv = torch.linalg.svdvals(torch.where(torch.isfinite(P), P, torch.zeros((), dtype=P.dtype)))
        sv[~ok] = float("nan")
        out[k] = sv  # (M, d), descending; nan rows = diverged
    return out


def _finite(W, U, L) -> dict:
    return {k: torch.isfinite(P).flatten(1).all(-1).tolist() for k, P in _maps(W, U, L).items()}


def _param_rank(W: torch.Tensor, tol: float) -> list[int]:
    """Rank of the residual model's raw parameter W (not of the map): full whenever I + W is near-singular."""
    return (torch.linalg.svdvals(W.double()) > tol).sum(-1).tolist()


# ------------------------------------------------------------------- metrics
def compute_metrics(out: dict, cfg: dict) -> dict:
    d = cfg["d"]
    per_mu = []
    rows = sweep_rows(cfg)
    for i, (mu, lr) in enumerate(rows):
        row = {"mu": mu, "lr": lr, "noise_std_first_coord": (1 - mu) * 2**0.5}
        for m in MODELS:
            sv = out["sv"][m][i]
            fin = bool(out["finite"][m][i])
            late = [r[i] for s_, r in zip(out["snapshots"]["step"], out["snapshots"][m])
                    if s_ >= (1 - cfg["persist_frac"]) * cfg["steps"]]
            row[m] = {
                "finite": fin,
                "rank": max(late) if (fin and late) else None,
                "final_rank": int((sv > cfg["rank_tol"]).sum()) if fin else None,
                **{f"rank_tol_{t:g}": (int((sv > t).sum()) if fin else None) for t in cfg["also_tols"]},
                "smallest_singular_values": sv.flip(0)[:8].tolist() if fin else None,
                "largest_singular_value": float(sv[0]) if fin else None,
            }
        row["residual"]["rank_of_parameter_W"] = out["linear_param_rank_W_residual"][i]
        per_mu.append(row)
    sweep = [per_mu[0]] + per_mu[len(cfg["mus"]):]
    per_mu = per_mu[: len(cfg["mus"])]
    lr_sweep = {
        "mu": cfg["mus"][0],
        "what": "ranks at the noisiest mu for each learning rate (reported, not judged)",
        "lrs": [r["lr"] for r in sweep],
        **{f"{m}_ranks": [r[m]["rank"] for r in sweep] for m in MODELS},
        "residual_parameter_W_ranks": [r["residual"]["rank_of_parameter_W"] for r in sweep],
    }
    order = sorted(range(len(sweep)), key=lambda j: lr_sweep["lrs"][j])
    lr_sweep = {k: ([v[j] for j in order] if isinstance(v, list) else v) for k, v in lr_sweep.items()}

    def ranks(m):
        return [p[m]["rank"] for p in per_mu]

    van = ranks("vanilla")
    summary = {
        "noisiest_mu": cfg["mus"][0],
        "cleanest_mu": cfg["mus"][-1],
        "vanilla_ranks": van,
        "residual_ranks": ranks("residual"),
        "linear_ranks": ranks("linear"),
        "vanilla_all_finite": all(p["vanilla"]["finite"] for p in per_mu),
        "residual_all_finite": all(p["residual"]["finite"] for p in per_mu),
        "linear_all_finite": all(p["linear"]["finite"] for p in per_mu),
        "vanilla_rank_loss_at_noisiest": (d - van[0]) if van[0] is not None else None,
        "vanilla_rank_drop_noisiest_vs_cleanest": (van[-1] - van[0]) if None not in (van[0], van[-1]) else None,
        "residual_min_rank": min((r for r in ranks("residual") if r is not None), default=None),
        "linear_min_rank": min((r for r in ranks("linear") if r is not None), default=None),
    }
    return {
        "rank_definition": cfg["rank"],
        "per_mu": per_mu,
        "summary": summary,
        "lr_sweep": lr_sweep,
        "singular_values": {m: out["sv"][m][: len(cfg["mus"])].tolist() for m in MODELS},
        "rank_over_time": out["snapshots"],
        "rank_over_time_rows": [list(r) for r in rows],
    }


# -------------------------------------------------------------------- figure
def _plot(rec: dict, plot_data: None, out_dir: Path) -> str:
    import numpy as np

    cfg, m = rec["config"], rec["metrics"]
    s = m["summary"]
    d = cfg["d"]
    mus = cfg["mus"]
    colors = {"vanilla": "tab:red", "residual": "tab:blue", "linear": "0.35"}
    names = {"vanilla": r"vanilla $WU$", "residual": r"residual $(I+W)(I+U)$ (inset)",
             "linear": r"single matrix $W$ (no symmetry)"}
    fig = new_figure((21, 5.0))
    axes = fig.subplots(1, 4, gridspec_kw={"width_ratios": [1.0, 1.25, 1.0, 0.9]})

    ax = axes[0]
    for k, mk, ls in (("linear", "^", ":"), ("residual", "s", "--"), ("vanilla", "o", "-")):
        r = [p[k]["rank"] for p in m["per_mu"]]
        ok = [(x, y) for x, y in zip(mus, r) if y is not None]
        ax.plot([x for x, _ in ok], [y for _, y in ok], marker=mk, ls=ls, color=colors[k], lw=2, ms=6, label=names[k])
        bad = [x for x, y in zip(mus, r) if y is None]
        if bad:
            ax.plot(bad, [d - 10] * len(bad), "x", color=colors[k], ms=9, mew=2, label=f"{k}: diverged")
    ax.axhline(d, color="0.6", lw=0.8)
    ax.set_xscale("log")
    ax.invert_xaxis()
    from matplotlib.ticker import NullFormatter

    ax.set_xticks(mus, [f"{v:g}" for v in mus])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel(r"signal weight $\mu$ in $y=\mu x+(1-\mu)\epsilon$, $\epsilon_i\sim N(0,2/i)$"
                  "\n(log scale; right = noisier)")
    ax.set_ylabel(f"rank of the learned map (singular values > {cfg['rank_tol']:g},\n"
                  f"at every snapshot of the last {cfg['persist_frac']:.0%} of training)")
    lo = min([v for k in MODELS for v in s[f"{k}_ranks"] if v is not None] + [d])
    ax.set_ylim(min(lo - 5, d - 20), d + 3)
    ax.legend(fontsize=8, loc="lower left")
    ax.grid(alpha=0.3, which="both")
    ax.set_title("rank against noise (the rank kept over the late snapshots)", fontsize=10)

    ax = axes[1]
    sv = {k: np.asarray(m["singular_values"][k], dtype=float) for k in MODELS}
    i_noisy = 0
    # At most 5 spectra per model, spread over the sweep, to keep the panel readable.
    cmap_idx = sorted({round(j * (len(mus) - 1) / 4) for j in range(5)}) if len(mus) > 5 else range(len(mus))
    import matplotlib.cm as cm

    for k, cmap in (("vanilla", cm.Reds), ("residual", cm.Blues)):
        for i in cmap_idx:
            if not np.all(np.isfinite(sv[k][i])):
                continue
            shade = 0.35 + 0.6 * (1 - i / max(1, len(mus) - 1))
            ax.semilogy(np.arange(1, d + 1), np.maximum(sv[k][i], 1e-12), color=cmap(shade),
                        ls="-" if k == "vanilla" else "--", lw=1.4,
                        label=f"{k}, $\\mu$={mus[i]:g}")
    if np.all(np.isfinite(sv["linear"][i_noisy])):
        ax.semilogy(np.arange(1, d + 1), np.maximum(sv["linear"][i_noisy], 1e-12), color="0.35", ls=":", lw=1.6,
                    label=f"single W, $\\mu$={mus[i_noisy]:g}")
    ax.axhline(cfg["rank_tol"], color="k", lw=0.8, ls="-.", label=f"rank threshold {cfg['rank_tol']:g}")
    ax.set_xlabel("index of singular value (descending)")
    ax.set_ylabel("singular value of the learned map")
    ax.set_ylim(1e-9, 3)
    ax.legend(fontsize=7, ncol=2, loc="lower left")
    ax.grid(alpha=0.3, which="both", lw=0.4)
    ax.set_title("singular spectra after training (darker = noisier;\nvanilla and residual nearly coincide)",
                 fontsize=10)

    ax = axes[2]
    snaps = m["rank_over_time"]
    steps = snaps["step"]
    for k, ls in (("vanilla", "-"), ("residual", "--")):
        arr = np.asarray([[np.nan if v is None else v for v in row] for row in snaps[k]], dtype=float)
        for i in (0, min(1, len(mus) - 1)):
            ax.plot(steps, arr[:, i], ls=ls, color=colors[k], lw=2 if i == 0 else 1.2, alpha=1 if i == 0 else 0.6,
                    label=f"{k} map, $\\mu$={mus[i]:g}")
    wr = np.asarray(snaps["residual_parameter_W"], dtype=float)
    ax.plot(steps, wr[:, 0], ls="-.", color="tab:cyan", lw=1.6, label=f"residual: its parameter W, $\\mu$={mus[0]:g}")
    ax.set_xlabel("SGD step")
    ax.set_ylabel(f"rank (> {cfg['rank_tol']:g})")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    ax.set_title("rank of the learned map during training, next to\nthe rank of the residual model's W", fontsize=10)

    ax = axes[3]
    sw = m["lr_sweep"]
    for k, mk, ls in (("linear", "^", ":"), ("residual", "s", "--"), ("vanilla", "o", "-")):
        pts = [(x, y) for x, y in zip(sw["lrs"], sw[f"{k}_ranks"]) if y is not None]
        ax.plot([x for x, _ in pts], [y for _, y in pts], marker=mk, ls=ls, color=colors[k], lw=2, ms=6,
                label=names[k])
    ax.axvline(cfg["lr"], color="0.6", lw=0.8, ls=":", label=f"lr of the judged sweep ({cfg['lr']:g})")
    ax.axhline(d, color="0.6", lw=0.8)
    ax.set_xlabel("learning rate")
    ax.set_ylabel("rank of the learned map")
    ax.legend(fontsize=7.5, loc="lower left")
    ax.grid(alpha=0.3)
    ax.set_title(f"learning-rate sweep at $\\mu$={sw['mu']:g} (reported, not judged)", fontsize=10)

    passed = {c["key"].split(".")[-1]: c["passed"] for c in rec["checks"]}
    van_ok = passed["vanilla_rank_loss_at_noisiest"] and passed["vanilla_rank_drop_noisiest_vs_cleanest"]
    fig.suptitle(
        f"Fig. 1-mid: {rec['verdict']}. Vanilla $WU$ loses rank under strong noise: {'yes' if van_ok else 'NO'} "
        f"(rank {s['vanilla_ranks'][0]} at $\\mu$={mus[0]:g}, {s['vanilla_ranks'][-1]} at $\\mu$={mus[-1]:g}); "
        f"residual stays full rank: {'yes' if passed['residual_min_rank'] else 'NO'} (min rank "
        f"{s['residual_min_rank']}); no-symmetry control min rank {s['linear_min_rank']}\n"
        f"d={d}, {cfg['steps']:,} SGD steps, lr {cfg['lr']:g}, batch 1, seed {cfg['seed']}",
        fontsize=10.5, color=verdict_color(rec["verdict"]),
    )
    return save_figure(fig, out_dir, "fig1_mid.png")


# ----------------------------------------------------------------------- run
def _deviations(cfg: dict) -> list[dict]:
    return [deviation("lr, steps, init, rank threshold", "not stated",
                      f"lr {cfg['lr']:g}, {cfg['steps']} steps, init scale {cfg['init_scale']:g}, rank tol "
                      f"{cfg['rank_tol']:g}", "the paper gives none; see config.lr_choice and config.rank; the lr "
                      "sweep at the noisiest mu is reported")]


def _notes(metrics: dict, cfg: dict) -> list[str]:
    s = metrics["summary"]
    sw = metrics["lr_sweep"]
    notes = [
        f"Learning-rate sweep at mu = {sw['mu']:g} (reported, not judged): lr {sw['lrs']} -> vanilla ranks "
        f"{sw['vanilla_ranks']}, residual {sw['residual_ranks']}, single matrix {sw['linear_ranks']}.",
        "Not given by the paper: lr, steps, init, rank threshold; see config.lr_choice and config.rank.",
        "The residual model is the same factorization A B (A = I + W, B = I + U) started at A = B = I: without "
        "weight decay SGD is translation-equivariant, so the rotation symmetry A -> A R, B -> R^T B is moved, "
        "not removed (the paper's own footnote 9). Its stationary conditions (I + W) n = 0 = n^T (I + U) can "
        "absorb SGD like vanilla's.",
    ]
    if s["residual_min_rank"] is not None and s["residual_min_rank"] < cfg["d"]:
        notes.append(
            f"The residual model lost rank too (ranks {s['residual_ranks']} over mu = {cfg['mus']}), while the "
            f"rank of its raw parameter W is at least {min(p['residual']['rank_of_parameter_W'] for p in metrics['per_mu'])}"
            f" of {cfg['d']} (W has eigenvalue -1 where I + W is singular). If the inset counted the rank of W rather than "
            "of the learned map, that would explain 'always full rank'."
        )
    if s["linear_min_rank"] is not None:
        notes.append(
            f"Control without any symmetry (single matrix W): min rank {s['linear_min_rank']} over the sweep "
            f"(ranks {s['linear_ranks']})."
        )
    return notes


def compute(cfg: dict, progress: bool = True) -> tuple[dict, None]:
    """Trains the sweep and measures it; the figure reads the record (no plot data)."""
    return compute_metrics(train(cfg, progress), cfg), None


def _headline(metrics: dict, cfg: dict) -> str:
    s = metrics["summary"]
    return (
        f"rank at mu={cfg['mus'][0]:g}..{cfg['mus'][-1]:g}: vanilla {s['vanilla_ranks']}, "
        f"residual {s['residual_ranks']}, single matrix {s['linear_ranks']} (of {cfg['d']})"
    )


def run(out_dir: str | Path, *, quick: bool = True, seed: int = 0, progress: bool = True,
        config: Optional[dict] = None) -> dict:
    """Train the sweep; writes fig1_mid.png, result.json and report.md into ``out_dir``."""
    return run_experiment(sys.modules[__name__], out_dir, quick=quick, seed=seed, progress=progress,
                          config=config, headline=_headline, notes=_notes, deviations=_deviations,
                          criteria=lambda metrics, cfg: _criteria(cfg["d"]))
