"""Sec. 4.3 / Sec. 4.7: matrix factorization with weight decay converges to low rank (the rotation symmetry).

Paper (Sec. 4.7): "Classical results show that the solutions are low-rank when weight decay is present (Srebro et
al., 2004) [...] The fact that these constrained structures disappear completely when the symmetry is removed
supports our claim that symmetry is the cause of them." The paper shows no figure for the weight-decay case.

Setting. Online regression y = A x + noise with x ~ N(0, I_d); the expected loss is 1/2 |M - A|_F^2 + const for
the learned map M, so gradient descent on it is full-batch training on the data distribution. Two models at each
weight decay gamma (coupled, as torch.optim.SGD's: gamma * p joins the gradient):

* ``factorized``  M = W U (the double rotation symmetry W -> W R, U -> R^T U), W, U trained;
* ``single``      M trained directly (no symmetry), the same weight decay.

What the theory predicts, in closed form. At balance, min over W U = M of 1/2 (|W|^2 + |U|^2) is the nuclear norm
|M|_*, so the factorized model minimizes 1/2 |M - A|^2 + gamma |M|_*, whose solution soft-thresholds the singular
values of A: sigma_i(M*) = max(sigma_i(A) - gamma, 0), rank = #{sigma_i(A) > gamma}. The single matrix minimizes
1/2 |M - A|^2 + gamma/2 |M|^2: M* = A / (1 + gamma), full rank. Both are computed from the SVD of A alone, not from
the training, and the trained models are compared with them.

The target's singular values are 2 i / d (i = 1..d, random singular vectors); each weight decay is placed midway
between two of them, so the predicted rank is unambiguous and the slowest direction decays at rate lr * (gamma -
sigma) = lr / d per step.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import torch
from tqdm import tqdm

from .common import apply_overrides, Criterion, deviation, new_figure, run_experiment, save_figure, verdict_color

EXPERIMENT = "mf-weight-decay"
TITLE = "Sec. 4.3 / 4.7: matrix factorization W U with weight decay converges to low rank; a single matrix does not"
CLAIM = (
    "Sec. 4.7: 'Classical results show that the solutions are low-rank when weight decay is present (Srebro et al., "
    "2004) [...] these constrained structures disappear completely when the symmetry is removed.'"
)
CLAIM_SHORT = "W U with weight decay converges to low rank (soft-thresholded spectrum); a single matrix stays full rank"

MAX_SV_ERROR = 1e-4  # the trained spectrum against the closed form max(sigma(A) - gamma, 0)


def _criteria(d: int) -> list[Criterion]:
    return [
        Criterion("summary.factorized_max_rank_error", "==", 0,
                  "with weight decay, rank(W U) equals the closed form #{sigma_i(A) > gamma} at every gamma"),
        Criterion("summary.factorized_max_sv_error", "<=", MAX_SV_ERROR,
                  "the spectrum of W U equals the nuclear-norm solution max(sigma_i(A) - gamma, 0)"),
        Criterion("summary.factorized_min_rank_drop", ">=", 1,
                  "weight decay lowers the rank of W U at every gamma (low rank, not only small)"),
        Criterion("summary.single_min_rank", "==", d,
                  "without the symmetry (a single matrix, same weight decay) the map stays full rank"),
        Criterion("summary.factorized_rank_without_weight_decay", "==", d,
                  "W U without weight decay reaches the full-rank target (training works)", control=True),
    ]


def make_config(quick: bool = True, seed: int = 0, **overrides) -> dict:
    cfg = {
        "quick": quick,
        "seed": seed,
        # Fig. 1-mid's factorization is 200 x 200; 100 keeps the full run at minutes (the slowest direction decays
        # at lr / d per step, so the steps grow with d)
        "d": 50 if quick else 100,
        "weight_decays": [0.5, 1.0] if quick else [0.25, 0.5, 1.0, 1.5],
        "lr": 0.1,
        "steps": 20_000 if quick else 40_000,
        "init_scale": 0.5,
        "rank_tol": 1e-6,
        "snapshots": 20,
        "dtype": "float64",
        "data": "y = A x + noise, x ~ N(0, I_d): expected loss 1/2 |M - A|_F^2 + const (gradient descent on it)",
        "target": "A = Q1 diag(2 i / d) Q2^T, Q1, Q2 random orthogonal",
        "optimizer": "gradient descent, constant lr, coupled weight decay gamma * p on every trained matrix",
        "init": "W, U ~ N(0, init_scale^2 / d); the single matrix starts from W0 U0 (the same function)",
        "rank": "number of singular values of the learned map above rank_tol",
    }
    apply_overrides(cfg, overrides)
    if any(g <= 0 for g in cfg["weight_decays"]):
        raise ValueError(f"weight_decays must be > 0 (0 is always run), got {cfg['weight_decays']}")
    d = cfg["d"]
    # midway between two singular values 2 i / d of the target, so that the predicted rank is unambiguous
    cfg["weight_decays_used"] = [(round(g * d / 2 - 0.5) + 0.5) * 2 / d for g in cfg["weight_decays"]]
    return cfg


def target(cfg: dict) -> torch.Tensor:
    d = cfg["d"]
    g = torch.Generator().manual_seed(int(cfg["seed"]))
    q1, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    sigma = 2.0 * torch.arange(1, d + 1, dtype=torch.float64) / d
    return q1 @ torch.diag(sigma) @ q2.T


def train(cfg: dict, progress: bool = True) -> dict:
    """Gradient descent of every (model, gamma) at once; the factorized rows are gamma = 0 then each gamma."""
    d, lr, steps = cfg["d"], cfg["lr"], cfg["steps"]
    dt = getattr(torch, cfg["dtype"])
    A = target(cfg).to(dt)
    gammas = torch.tensor([0.0] + list(cfg["weight_decays_used"]), dtype=dt)
    S = len(gammas)
    g = torch.Generator().manual_seed(int(cfg["seed"]) + 1)
    W0 = torch.randn(d, d, generator=g, dtype=torch.float64).to(dt) * cfg["init_scale"] / d**0.5
    U0 = torch.randn(d, d, generator=g, dtype=torch.float64).to(dt) * cfg["init_scale"] / d**0.5
    W, U = W0.expand(S, d, d).clone(), U0.expand(S, d, d).clone()
    M = (W0 @ U0).expand(S - 1, d, d).clone()  # the single matrix, at each gamma > 0
    gv, gm = gammas.view(S, 1, 1), gammas[1:].view(S - 1, 1, 1)
    every = max(1, steps // cfg["snapshots"])
    snaps = {"step": [], "factorized": [], "single": []}
    with tqdm(total=steps, desc="mf-weight-decay GD", unit="step", disable=not progress, leave=False) as bar:
        for t in range(1, steps + 1):
            G = W @ U - A
            gW = G @ U.mT + gv * W
            gU = W.mT @ G + gv * U
            W -= lr * gW
            U -= lr * gU
            M -= lr * ((M - A) + gm * M)
            if t % every == 0:
                snaps["step"].append(t)
                snaps["factorized"].append(_rank(W @ U, cfg["rank_tol"]))
                snaps["single"].append(_rank(M, cfg["rank_tol"]))
            if t % 500 == 0:
                bar.update(500)
        bar.update(steps % 500)
    return {"A": A, "factorized": W @ U, "single": M, "snapshots": snaps,
            "balance": (W.pow(2).sum((-2, -1)) - U.pow(2).sum((-2, -1))).tolist()}


def _rank(P: torch.Tensor, tol: float) -> list[int]:
    return (torch.linalg.svdvals(P.double()) > tol).sum(-1).tolist()


def compute_metrics(out: dict, cfg: dict) -> dict:
    sa = torch.linalg.svdvals(out["A"].double())  # descending
    d, tol = cfg["d"], cfg["rank_tol"]
    sf = torch.linalg.svdvals(out["factorized"].double())
    ss = torch.linalg.svdvals(out["single"].double())
    finite = bool(torch.isfinite(sf).all() and torch.isfinite(ss).all())
    per_gamma = []
    for j, gamma in enumerate(cfg["weight_decays_used"]):
        svt = (sa - gamma).clamp_min(0.0)  # the nuclear-norm (soft-thresholding) solution
        ridge = sa / (1 + gamma)  # the single matrix's solution
        f, s = sf[j + 1], ss[j]
        per_gamma.append({
            "gamma": gamma,
            "predicted_rank": int((sa > gamma).sum()),
            "factorized_rank": int((f > tol).sum()),
            "factorized_sv_error": float((f - svt).abs().max()),
            "single_rank": int((s > tol).sum()),
            "single_sv_error": float((s - ridge).abs().max()),
            "factorized_singular_values": f.tolist(),
            "single_singular_values": s.tolist(),
        })
    summary = {
        "all_finite": finite,
        "factorized_rank_without_weight_decay": int((sf[0] > tol).sum()),
        "factorized_ranks": [p["factorized_rank"] for p in per_gamma],
        "predicted_ranks": [p["predicted_rank"] for p in per_gamma],
        "single_ranks": [p["single_rank"] for p in per_gamma],
        "factorized_max_rank_error": max(abs(p["factorized_rank"] - p["predicted_rank"]) for p in per_gamma),
        "factorized_max_sv_error": max(p["factorized_sv_error"] for p in per_gamma) if finite else None,
        "factorized_min_rank_drop": min(d - p["factorized_rank"] for p in per_gamma),
        "single_min_rank": min(p["single_rank"] for p in per_gamma),
        "single_max_sv_error": max(p["single_sv_error"] for p in per_gamma) if finite else None,
    }
    return {"per_gamma": per_gamma, "summary": summary, "target_singular_values": sa.tolist(),
            "rank_over_time": out["snapshots"], "factor_balance_final": out["balance"]}


def _plot(rec: dict, plot_data: None, out_dir: Path) -> str:
    cfg, m = rec["config"], rec["metrics"]
    d = cfg["d"]
    fig = new_figure((15, 4.8))
    axes = fig.subplots(1, 3)
    sa = m["target_singular_values"]
    idx = list(range(1, d + 1))
    ax = axes[0]
    ax.plot(idx, sa, "k-", lw=1.2, label="target A")
    colors = ["tab:red", "tab:orange", "tab:purple", "tab:brown"]
    for p, c in zip(m["per_gamma"], colors):
        ax.plot(idx, p["factorized_singular_values"], "-", color=c, lw=2, label=f"W U, gamma {p['gamma']:.3g}")
        ax.plot(idx, [max(s - p["gamma"], 0) for s in sa], ":", color="k", lw=1)
        ax.plot(idx, p["single_singular_values"], "--", color=c, lw=1, alpha=0.6,
                label=f"single matrix, gamma {p['gamma']:.3g}")
    ax.set_xlabel("index of singular value (descending)")
    ax.set_ylabel("singular value of the learned map")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    ax.set_title("spectra (dotted: closed form max(sigma(A) - gamma, 0))", fontsize=9.5)
    ax = axes[1]
    gs = [p["gamma"] for p in m["per_gamma"]]
    ax.plot(gs, m["summary"]["predicted_ranks"], "ks", ms=10, mfc="none", label="closed form #{sigma(A) > gamma}")
    ax.plot(gs, m["summary"]["factorized_ranks"], "o-", color="tab:red", label="W U (rotation symmetry)")
    ax.plot(gs, m["summary"]["single_ranks"], "^--", color="0.35", label="single matrix (no symmetry)")
    ax.set_xlabel("weight decay gamma")
    ax.set_ylabel(f"rank (singular values > {cfg['rank_tol']:g})")
    ax.set_ylim(0, d + 3)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    ax.set_title("rank after training", fontsize=10)
    ax = axes[2]
    sn = m["rank_over_time"]
    for j, c in zip(range(len(gs) + 1), ["k"] + colors):
        label = "W U, no weight decay" if j == 0 else f"W U, gamma {gs[j - 1]:.3g}"
        ax.plot(sn["step"], [r[j] for r in sn["factorized"]], "-", color=c, lw=1.6, label=label)
    ax.set_xlabel("gradient-descent step")
    ax.set_ylabel("rank of W U")
    ax.set_ylim(0, d + 3)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("rank during training", fontsize=10)
    fig.suptitle(f"Sec. 4.3: matrix factorization with weight decay (d={d}, {cfg['steps']:,} GD steps, lr "
                 f"{cfg['lr']:g}): {rec['verdict']}", fontsize=11, color=verdict_color(rec["verdict"]))
    return save_figure(fig, out_dir, "mf_weight_decay.png")


def compute(cfg: dict, progress: bool = True) -> tuple[dict, None]:
    return compute_metrics(train(cfg, progress), cfg), None


def _headline(metrics: dict, cfg: dict) -> str:
    s = metrics["summary"]
    return (f"gamma {[round(g, 3) for g in cfg['weight_decays_used']]}: rank W U {s['factorized_ranks']} (closed form "
            f"{s['predicted_ranks']}, spectrum error {s['factorized_max_sv_error']:.1e}), single matrix "
            f"{s['single_ranks']} of {cfg['d']}")


def _deviations(cfg: dict) -> list[dict]:
    return [deviation("optimizer and data", "not stated (no experiment in the paper)",
                      "gradient descent on the expected loss of online Gaussian data",
                      "the claim is about the solutions; the expected loss has them in closed form")]


def run(out_dir: str | Path, *, quick: bool = True, seed: int = 0, progress: bool = True,
        config: Optional[dict] = None) -> dict:
    """Train the factorized and single-matrix models; writes mf_weight_decay.png, result.json, report.md."""
    return run_experiment(sys.modules[__name__], out_dir, quick=quick, seed=seed, progress=progress, config=config,
                          headline=_headline, deviations=_deviations,
                          notes=["Closed forms from the SVD of A: nuclear-norm soft thresholding for W U (Srebro et "
                                 "al., 2004), ridge shrinkage A / (1 + gamma) for the single matrix."],
                          criteria=lambda metrics, cfg: _criteria(cfg["d"]))
