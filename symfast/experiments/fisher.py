"""Sec. 4.3: the Fisher information is singular at symmetric solutions, along the mirror's directions O.

Paper (Sec. 4.3): "Our result implies that the Fisher information is singular close to any symmetry solutions.
Note that O^T grad_w l(w, x) = 0 for a symmetry solution and any x. Therefore, the Fisher information has a zero
eigenvalue along the directions orthogonal to any mirror symmetry." The paper shows no figure for it.

Setting. A small tanh network ``f(x) = sum_j c_j tanh(W_j x + b_j)`` (float64) with the per-sample loss
``1/2 (f(x) - y)^2`` on a two-neuron teacher. Two mirrors, built with :mod:`symfast.symmetry`:

* the sign flip of hidden unit 0 (tanh is odd): ``O`` = the coordinates of (W_0, b_0, c_0); condition: unit 0 dead;
* the exchange of units 1 and 2 (eq. 5): ``O = [I; -I] / sqrt(2)``; condition: theta_1 = theta_2.

Together ``O`` has ``k = 2 (d + 2)`` orthonormal columns. At random points moved onto both conditions (the
mirror's symmetric solution), the empirical Fisher ``J = mean_i g_i g_i^T`` of the per-sample gradients g_i (from
symfast's per-sample engine, :func:`symfast.per_sample_directional_derivatives` along every coordinate) must have
exactly k eigenvalues that are zero to rounding, and their eigenvectors must span im O; at the random points
themselves (off the conditions) J must have none. Near the condition, at distance s along O, the Fisher's O-block
``O^T J O`` must grow like s^2 (the O-component of every per-sample gradient is odd in s, hence linear).

Independent path (control): the per-sample gradients again with ``torch.func.vmap(torch.func.grad)`` and the
eigenvalues with ``numpy.linalg.eigh``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch.func import grad, vmap
from tqdm import tqdm

from ..curvature import per_sample_directional_derivatives
from ..symmetry import flatten, unflatten, unit_permutation_mirror, unit_sign_mirror
from .common import apply_overrides, Criterion, deviation, new_figure, run_experiment, save_figure, verdict_color

EXPERIMENT = "fisher"
TITLE = "Sec. 4.3: the Fisher information is singular at symmetric solutions, along the mirror's directions O"
CLAIM = (
    "Sec. 4.3: 'the Fisher information is singular close to any symmetry solutions. [...] O^T grad_w l(w, x) = 0 for "
    "a symmetry solution and any x. Therefore, the Fisher information has a zero eigenvalue along the directions "
    "orthogonal to any mirror symmetry.'"
)
CLAIM_SHORT = "at a symmetric solution the empirical Fisher has exactly the mirror's k null directions (im O)"

NULL_TOL = 1e-12  # an eigenvalue is zero when below NULL_TOL x the largest (float64 rounding is ~1e-16)
SUBSPACE_MAX = 1e-6  # the null eigenvectors' component outside im O (sine of the largest principal angle)
SLOPE_TOL = 0.1  # log-log slope of the O-block against the distance s: 2 +- SLOPE_TOL
CONTROL_MAX = 1e-10  # the engine against torch.func, numpy's eigenvalues against torch's (relative)

NAMES = ("W", "b", "c")


def _criteria() -> list[Criterion]:
    return [
        Criterion("summary.symmetric_max_null_count_error", "==", 0,
                  f"at every symmetric point the Fisher has exactly k = 2 (d + 2) eigenvalues below {NULL_TOL:g} x "
                  "the largest (the mirror's predicted null directions, no more, no fewer)"),
        Criterion("summary.symmetric_max_subspace_error", "<=", SUBSPACE_MAX,
                  "those null eigenvectors span im O (largest principal-angle sine between them and O)"),
        Criterion("summary.generic_max_null_count", "==", 0,
                  "at the random points off the conditions the Fisher has no zero eigenvalue"),
        Criterion("summary.near_slope_error", "<=", SLOPE_TOL,
                  "near the condition, |O^T J O| grows like s^2 with the distance s (|log-log slope - 2|)"),
        Criterion("summary.control_max_error", "<=", CONTROL_MAX,
                  "per-sample gradients of the engine = torch.func's, numpy's eigenvalues = torch's (relative)",
                  control=True),
    ]


CRITERIA = _criteria()


def make_config(quick: bool = True, seed: int = 0, **overrides) -> dict:
    cfg = {
        "quick": quick,
        "seed": seed,
        "d": 3 if quick else 5,
        "hidden": 5 if quick else 8,
        "samples": 256 if quick else 1024,
        "points": 3 if quick else 8,  # random points, each moved onto the conditions
        "distances": [1e-4, 1e-3, 1e-2, 1e-1],
        "label_noise_std": 0.1,
        "init_scale": 0.7,
        "dtype": "float64",
        "data": "x ~ N(0, I_d), y = tanh(a1 . x) + 0.5 tanh(a2 . x) + label_noise_std N(0, 1)",
        "loss": "per-sample 1/2 (f(x) - y)^2, f(x) = sum_j c_j tanh(W_j x + b_j)",
        "mirrors": "sign flip of unit 0 (condition: unit 0 dead) and exchange of units 1, 2 (theta_1 = theta_2)",
    }
    apply_overrides(cfg, overrides)
    if cfg["hidden"] < 3:
        raise ValueError(f"hidden must be >= 3 (unit 0 dead, units 1 and 2 merged), got {cfg['hidden']}")
    if cfg["points"] < 1:
        raise ValueError(f"points must be >= 1, got {cfg['points']}")
    return cfg


def _loss(p: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample losses [B]."""
    return 0.5 * (torch.tanh(x @ p["W"].T + p["b"]) @ p["c"] - y) ** 2


def data(cfg: dict, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    dt = getattr(torch, cfg["dtype"])
    a = torch.randn(2, cfg["d"], generator=g, dtype=dt)
    X = torch.randn(cfg["samples"], cfg["d"], generator=g, dtype=dt)
    y = torch.tanh(X @ a[0]) + 0.5 * torch.tanh(X @ a[1]) + cfg["label_noise_std"] * torch.randn(
        cfg["samples"], generator=g, dtype=dt)
    return X, y


def random_point(cfg: dict, g: torch.Generator) -> dict:
    dt = getattr(torch, cfg["dtype"])
    h, d, s = cfg["hidden"], cfg["d"], cfg["init_scale"]
    return {"W": torch.randn(h, d, generator=g, dtype=dt) * s, "b": torch.randn(h, generator=g, dtype=dt) * s,
            "c": torch.randn(h, generator=g, dtype=dt) * s}


def mirrors(p: dict) -> tuple:
    """The two mirrors of the network, built by symfast.symmetry from the parameter layout."""
    return (unit_sign_mirror(p, ["W", "b"], [("c", 0)], 0),
            unit_permutation_mirror(p, ["W", "b"], [("c", 0)], 1, 2))


def onto_conditions(p: dict, ms: tuple) -> dict:
    for m in ms:  # the mirrors touch disjoint coordinates, so their projections commute
        p = m.symmetric_solution(p)
    return p


def per_sample_gradients(p: dict, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """[B, D]: symfast's per-sample engine along every coordinate direction."""
    D = sum(v.numel() for v in p.values())
    eye = torch.eye(D, dtype=X.dtype)
    directions = {k: v.reshape(D, *p[k].shape) for k, v in unflatten_rows(eye, p).items()}
    return per_sample_directional_derivatives(lambda q, batch: _loss(q, *batch), p, directions, (X, y),
                                              chunk_size=D)


def unflatten_rows(M: torch.Tensor, like: dict) -> dict:
    """Rows of M (each a flat parameter vector) split into the parameters, [K, numel] each."""
    sizes = [like[k].numel() for k in like]
    return dict(zip(like, M.split(sizes, dim=1)))


def per_sample_gradients_torch_func(p: dict, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """[B, D]: the independent path, vmap over samples of grad."""
    grads = vmap(grad(lambda q, x, t: _loss(q, x[None], t[None])[0]), in_dims=(None, 0, 0))(p, X, y)
    return torch.cat([grads[k].reshape(len(X), -1) for k in p], 1)


def fisher(G: torch.Tensor) -> torch.Tensor:
    return G.T @ G / G.shape[0]


def analyse_point(p: dict, O: torch.Tensor, X, y) -> dict:
    G = per_sample_gradients(p, X, y)
    J = fisher(G)
    ev, V = torch.linalg.eigh(J)  # ascending
    top = float(ev[-1])
    null = ev <= NULL_TOL * top
    k = O.shape[1]
    Vn = V[:, :k]  # the k smallest: the predicted null space
    subspace = float(torch.linalg.matrix_norm(Vn - O @ (O.T @ Vn), ord=2))
    G_ref = per_sample_gradients_torch_func(p, X, y)
    ev_np = np.linalg.eigvalsh(fisher(G_ref).numpy())
    return {
        "eigenvalues": ev.tolist(),
        "null_count": int(null.sum()),
        "smallest_relative": float(ev[0]) / top,
        "kth_relative": float(ev[k - 1]) / top,
        "next_relative": float(ev[k]) / top if k < len(ev) else None,
        "subspace_error": subspace,
        "o_block_relative": float(torch.linalg.matrix_norm(O.T @ J @ O, ord=2)) / top,
        "engine_vs_torch_func": float((G - G_ref).abs().max() / G_ref.abs().max()),
        "numpy_vs_torch_eigenvalues": float(np.abs(ev_np - ev.numpy()).max() / top),
    }


def compute(cfg: dict, progress: bool = True) -> tuple[dict, None]:
    g = torch.Generator().manual_seed(int(cfg["seed"]))
    X, y = data(cfg, g)
    rows = []
    with tqdm(total=cfg["points"], desc="fisher points", unit="point", disable=not progress, leave=False) as bar:
        for _ in range(cfg["points"]):
            p0 = random_point(cfg, g)
            ms = mirrors(p0)
            O = torch.cat([m.basis for m in ms], 1).to(X.dtype)
            ps = onto_conditions(p0, ms)
            z = torch.randn(O.shape[1], generator=g, dtype=X.dtype)
            z = z / z.norm()
            near = []
            for s in cfg["distances"]:
                q = unflatten(flatten(ps) + s * (O @ z), ps)
                J = fisher(per_sample_gradients(q, X, y))
                near.append(float(torch.linalg.matrix_norm(O.T @ J @ O, ord=2)))
            rows.append({"k": O.shape[1], "symmetric": analyse_point(ps, O, X, y),
                         "generic": analyse_point(p0, O, X, y), "near_o_block": near,
                         "near_slope": float(np.polyfit(np.log(cfg["distances"]), np.log(near), 1)[0])})
            bar.update(1)
    sym, gen = [r["symmetric"] for r in rows], [r["generic"] for r in rows]
    summary = {
        "k": rows[0]["k"],
        "parameters": len(sym[0]["eigenvalues"]),
        "symmetric_null_counts": [s["null_count"] for s in sym],
        "symmetric_max_null_count_error": max(abs(s["null_count"] - r["k"]) for s, r in zip(sym, rows)),
        "symmetric_max_kth_relative": max(s["kth_relative"] for s in sym),
        "symmetric_min_next_relative": min(s["next_relative"] for s in sym),
        "symmetric_max_subspace_error": max(s["subspace_error"] for s in sym),
        "symmetric_max_o_block_relative": max(s["o_block_relative"] for s in sym),
        "generic_null_counts": [s["null_count"] for s in gen],
        "generic_max_null_count": max(s["null_count"] for s in gen),
        "generic_min_smallest_relative": min(s["smallest_relative"] for s in gen),
        "near_slopes": [r["near_slope"] for r in rows],
        "near_slope_error": max(abs(r["near_slope"] - 2.0) for r in rows),
        "control_max_error": max(max(s["engine_vs_torch_func"], s["numpy_vs_torch_eigenvalues"]) for s in sym + gen),
    }
    return {"points": rows, "summary": summary}, None


def _plot(rec: dict, plot_data: None, out_dir: Path) -> str:
    cfg, m = rec["config"], rec["metrics"]
    s = m["summary"]
    fig = new_figure((15, 4.6))
    axes = fig.subplots(1, 3)
    ax = axes[0]
    r0 = m["points"][0]
    for key, color, label in (("generic", "0.4", "random point"), ("symmetric", "tab:red", "on the conditions")):
        ev = np.array(r0[key]["eigenvalues"])
        ax.semilogy(np.arange(1, len(ev) + 1), np.maximum(np.abs(ev) / ev[-1], 1e-20), "o-", ms=4, color=color,
                    label=label)
    ax.axhline(NULL_TOL, color="k", ls=":", lw=0.8, label=f"zero threshold {NULL_TOL:g}")
    ax.axvline(s["k"] + 0.5, color="tab:red", ls="--", lw=0.8, label=f"k = {s['k']} predicted null directions")
    ax.set_xlabel("eigenvalue index (ascending)")
    ax.set_ylabel("|eigenvalue| / largest")
    ax.set_ylim(1e-20, 3)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    ax.set_title("empirical Fisher spectrum (point 1)", fontsize=10)
    ax = axes[1]
    ds = np.array(cfg["distances"])
    for i, r in enumerate(m["points"]):
        ax.loglog(ds, r["near_o_block"], "o-", color="tab:blue", alpha=0.6, label="points" if i == 0 else None)
    ref = m["points"][0]["near_o_block"][-1] * (ds / ds[-1]) ** 2
    ax.loglog(ds, ref, "k:", label="slope 2")
    ax.set_xlabel("distance s from the conditions along O")
    ax.set_ylabel("|O^T J O| (spectral norm)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    ax.set_title(f"Fisher along O near the conditions: slopes {', '.join(f'{v:.2f}' for v in s['near_slopes'])}",
                 fontsize=9)
    ax = axes[2]
    idx = np.arange(1, len(m["points"]) + 1)
    ax.bar(idx - 0.2, s["symmetric_null_counts"], 0.4, color="tab:red", label="on the conditions")
    ax.bar(idx + 0.2, s["generic_null_counts"], 0.4, color="0.4", label="random point")
    ax.axhline(s["k"], color="k", ls="--", lw=1, label=f"predicted k = {s['k']}")
    ax.set_xlabel("point")
    ax.set_ylabel(f"eigenvalues < {NULL_TOL:g} x largest")
    ax.set_xticks(idx)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    ax.set_title(f"null directions; span error vs im O {s['symmetric_max_subspace_error']:.1e}", fontsize=10)
    fig.suptitle(f"Sec. 4.3: Fisher information at symmetric solutions (tanh net d={cfg['d']}, {cfg['hidden']} units, "
                 f"{s['parameters']} parameters, {cfg['samples']} samples): {rec['verdict']}", fontsize=11,
                 color=verdict_color(rec["verdict"]))
    return save_figure(fig, out_dir, "fisher.png")


def _headline(metrics: dict, cfg: dict) -> str:
    s = metrics["summary"]
    return (f"{cfg['points']} points, {s['parameters']} parameters: zero eigenvalues on the conditions "
            f"{s['symmetric_null_counts']} (predicted k = {s['k']}, span error "
            f"{s['symmetric_max_subspace_error']:.0e}, "
            f"next eigenvalue >= {s['symmetric_min_next_relative']:.0e}), at random points {s['generic_null_counts']} "
            f"(smallest >= {s['generic_min_smallest_relative']:.0e}); O-block slope "
            f"{min(s['near_slopes']):.2f}..{max(s['near_slopes']):.2f}")


def _deviations(cfg: dict) -> list[dict]:
    return [deviation("model and data", "not stated (no experiment in the paper)",
                      "tanh network, two-neuron teacher, random points moved onto two mirrors' conditions",
                      "the claim holds for any loss with the mirror; a small net gives the exact Fisher in float64")]


def run(out_dir: str | Path, *, quick: bool = True, seed: int = 0, progress: bool = True,
        config: Optional[dict] = None) -> dict:
    """Measure the empirical Fisher on and off the symmetric conditions; writes fisher.png, result.json, report.md."""
    return run_experiment(sys.modules[__name__], out_dir, quick=quick, seed=seed, progress=progress, config=config,
                          headline=_headline, deviations=_deviations,
                          notes=["The empirical Fisher (mean of per-sample gradient outer products) is the paper's "
                                 "J = E_x[grad l grad l^T]; the model's Fisher would use the model's own predictive "
                                 "distribution instead of the labels, and has the same null directions here (its "
                                 "per-sample factor is grad f, whose O-component also vanishes on the conditions)."])
