"""Fig. 2 (left) / Sec. 4.2: near a symmetric solution the Hessian splits into a block on im O and one on ker O^T.

Paper (Sec. 4.2): "Part 2 states that H close to symmetry solutions are *partitioned* by the symmetry condition
I - 2P to two subspaces [...] one can transform the Hessian into a two-block form, H_perp and H_par, with O." Fig.
2-left draws such a block Hessian; the paper computes none.

Setting. A small tanh network ``f(x) = sum_j c_j tanh(W_j x + b_j)`` (float64) with more hidden units than its
two-neuron teacher, trained by full-batch gradient descent on mean 1/2 (f(x) - y)^2 + gamma/2 |theta|^2 from a
start near a symmetric solution (two units at the teacher's neurons, a surplus unit small). Weight decay pulls the
network onto the condition of one of its mirrors: the sign flip of a unit (tanh is odd; condition: the unit is dead)
or the exchange of two units (eq. 5; condition: the units are identical), built with
:func:`symfast.symmetry.unit_sign_mirror` / :func:`~symfast.symmetry.unit_permutation_mirror`. The mirror followed
is the one whose condition is nearest at the end of training; its O is used at every snapshot.

At snapshots along training, the exact Hessian of the training loss (``torch.func.hessian``) is computed and
measured against the two subspaces:

* the overlap of each top eigenvector v (largest |eigenvalue|) with im O, |O^T v|^2 (1 - that is its overlap with
  ker O^T): on the condition every eigenvector lies in one of the two (Theorem 4, part 2), so the overlaps are 0
  or 1; the "mixing" is max_v min(|O^T v|^2, 1 - |O^T v|^2);
* the off-diagonal block |O^T H (I - O O^T)|, which the symmetry makes odd in the distance s = |O^T theta|, so it
  must shrink like s.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch.func import hessian
from tqdm import tqdm

from ..symmetry import flatten, unflatten, unit_permutation_mirror, unit_sign_mirror
from .common import apply_overrides, Criterion, deviation, new_figure, run_experiment, save_figure, verdict_color

EXPERIMENT = "fig2"
TITLE = "Fig. 2-left / Sec. 4.2: along training near a symmetric solution the Hessian splits into im O and ker O^T"
CLAIM = (
    "Sec. 4.2 / Fig. 2: 'H close to symmetry solutions are partitioned by the symmetry condition I - 2P to two "
    "subspaces: one part aligns with the images of P, and the other part must be orthogonal to it.'"
)
CLAIM_SHORT = "near a symmetric solution the Hessian's top eigenvectors lie in im O or ker O^T (two blocks)"

ON_CONDITION = 1e-6  # the run must end this close to the condition for the end-of-training checks to apply
MAX_MIXING = 1e-6  # end: every top eigenvector in im O or ker O^T, up to this
MAX_OFF_BLOCK = 1e-6  # end: |O^T H (I - O O^T)| / |H|
SLOPE_TOL = 0.15  # the off-diagonal block against s on log-log axes: slope 1 +- SLOPE_TOL
SLOPE_RANGE = (1e-8, 1e-2)  # the snapshots with s in this range enter the slope (small s: linear regime)
CLUSTER_TOL = 1e-7  # eigenvalues closer than this (relative to |H|) are one repeated eigenvalue
CONTROL_MAX = 1e-12  # at the exact symmetric solution the off-diagonal block is 0 to rounding


def _criteria() -> list[Criterion]:
    return [
        Criterion("summary.final_distance", "<=", ON_CONDITION,
                  "gradient descent with weight decay ends on a symmetric condition (a dead unit or two identical "
                  "units)"),
        Criterion("summary.final_top_mixing", "<=", MAX_MIXING,
                  "at the end every top eigenvector of H lies in im O or in ker O^T (overlaps 0 or 1; a repeated "
                  "eigenvalue's eigenspace is split by its principal directions)"),
        Criterion("summary.final_off_block", "<=", MAX_OFF_BLOCK,
                  "at the end the block O^T H (I - O O^T) vanishes (relative to |H|)"),
        Criterion("summary.final_spectrum_split", "<=", MAX_OFF_BLOCK,
                  "at the end the spectrum of H is the union of the spectra of its blocks on im O and ker O^T "
                  "(max eigenvalue difference relative to |H|)"),
        Criterion("summary.off_block_slope_error", "<=", SLOPE_TOL,
                  f"along training the off-diagonal block shrinks like s = |O^T theta| (|log-log slope - 1|, s in "
                  f"{SLOPE_RANGE})"),
        Criterion("summary.exact_symmetric_off_block", "<=", CONTROL_MAX,
                  "at the end point projected exactly onto the condition the off-diagonal block is 0 (Theorem 4 "
                  "part 2, by construction)", control=True),
    ]


CRITERIA = _criteria()


def make_config(quick: bool = True, seed: int = 0, **overrides) -> dict:
    cfg = {
        "quick": quick,
        "seed": seed,
        "d": 3,
        "hidden": 3,
        "samples": 128,
        "weight_decay": 0.1,
        "lr": 0.1,
        "steps": 12_000 if quick else 30_000,
        "snapshots": 30 if quick else 60,
        # eigenvalues of the two blocks can coincide (both contain directions where only the weight decay curves
        # the loss), and eigenvectors of a repeated eigenvalue may mix the blocks freely: the overlaps are followed
        # for the largest |eigenvalues|, the spectrum for all
        "top_eigenvectors": 6,
        "init_noise": 0.1,  # units 0, 1 start at the teacher's two neurons plus this much noise
        "small_unit_scale": 0.1,  # the other units start this small (near their condition)
        "label_noise_std": 0.1,
        "dtype": "float64",
        "data": "x ~ N(0, I_d), y = tanh(a1 . x) + 0.5 tanh(a2 . x) + label_noise_std N(0, 1)",
        "optimizer": "full-batch gradient descent, constant lr, on mean 1/2 (f - y)^2 + gamma/2 |theta|^2",
    }
    apply_overrides(cfg, overrides)
    if cfg["hidden"] < 3:
        raise ValueError(f"hidden must be >= 3 (more units than the two-neuron teacher), got {cfg['hidden']}")
    D = cfg["hidden"] * (cfg["d"] + 2)
    if cfg["top_eigenvectors"] is not None and not 1 <= cfg["top_eigenvectors"] <= D:
        raise ValueError(f"top_eigenvectors must be None or in [1, {D}], got {cfg['top_eigenvectors']}")
    return cfg


def _forward(p: dict, X: torch.Tensor) -> torch.Tensor:
    return torch.tanh(X @ p["W"].T + p["b"]) @ p["c"]


def data(cfg: dict, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inputs, labels and the teacher's two input weight vectors a."""
    dt = getattr(torch, cfg["dtype"])
    a = torch.randn(2, cfg["d"], generator=g, dtype=dt)
    X = torch.randn(cfg["samples"], cfg["d"], generator=g, dtype=dt)
    y = torch.tanh(X @ a[0]) + 0.5 * torch.tanh(X @ a[1]) + cfg["label_noise_std"] * torch.randn(
        cfg["samples"], generator=g, dtype=dt)
    return X, y, a


def init(cfg: dict, g: torch.Generator, a: torch.Tensor) -> dict:
    """Near a symmetric solution: units 0, 1 near the teacher's neurons, the surplus units small."""
    dt = getattr(torch, cfg["dtype"])
    h, d, s = cfg["hidden"], cfg["d"], cfg["small_unit_scale"]
    p = {"W": torch.randn(h, d, generator=g, dtype=dt) * s, "b": torch.randn(h, generator=g, dtype=dt) * s,
         "c": torch.randn(h, generator=g, dtype=dt) * s}
    e = cfg["init_noise"]
    p["W"][:2] = a + e * torch.randn(2, d, generator=g, dtype=dt)
    p["b"][:2] = e * torch.randn(2, generator=g, dtype=dt)
    p["c"][:2] = torch.tensor([1.0, 0.5], dtype=dt) + e * torch.randn(2, generator=g, dtype=dt)
    return p


def train(cfg: dict, progress: bool) -> dict:
    g = torch.Generator().manual_seed(int(cfg["seed"]))
    X, y, a = data(cfg, g)
    p = {k: v.requires_grad_() for k, v in init(cfg, g, a).items()}
    steps, gamma = cfg["steps"], cfg["weight_decay"]
    # log-spaced to see the start, evenly spaced to follow the exponential approach to the condition
    half = max(2, cfg["snapshots"] // 2)
    at = set(np.geomspace(1, steps, half).astype(int).tolist()) | set(np.linspace(0, steps, half).astype(int).tolist())
    snaps = []
    with tqdm(total=steps, desc="fig2 GD", unit="step", disable=not progress, leave=False) as bar:
        for t in range(steps + 1):
            if t in at:
                snaps.append((t, {k: v.detach().clone() for k, v in p.items()}))
            if t == steps:
                break
            loss = 0.5 * ((_forward(p, X) - y) ** 2).mean() + 0.5 * gamma * sum((v ** 2).sum() for v in p.values())
            grads = torch.autograd.grad(loss, list(p.values()))
            with torch.no_grad():
                for v, gv in zip(p.values(), grads):
                    v -= cfg["lr"] * gv
            if (t + 1) % 1000 == 0:
                bar.update(1000)
        bar.update(steps % 1000)
    return {"X": X, "y": y, "snapshots": snaps}


def loss_hessian(p: dict, X: torch.Tensor, y: torch.Tensor, gamma: float) -> torch.Tensor:
    """The exact Hessian [D, D] of the training loss in the flat coordinates of symfast.symmetry.flatten."""
    flat = flatten(p)

    def loss(v):
        q = unflatten(v, p)
        return 0.5 * ((_forward(q, X) - y) ** 2).mean() + 0.5 * gamma * (v ** 2).sum()

    return hessian(loss)(flat)


def aligned_overlaps(ev: torch.Tensor, V: torch.Tensor, O: torch.Tensor, tol: float) -> torch.Tensor:
    """|O^T v|^2 for every eigenvector, with the eigenvectors of each cluster of (numerically) repeated eigenvalues
    rotated to their principal directions against O: an eigenvector of a repeated eigenvalue is any vector of its
    eigenspace, and only the eigenspace has a meaning. A symmetry group larger than one mirror (three identical
    units) repeats eigenvalues across im O and ker O^T."""
    out = torch.empty_like(ev)
    start = 0
    for i in range(1, len(ev) + 1):
        if i == len(ev) or ev[i] - ev[i - 1] > tol:
            cols = V[:, start:i]
            sv = torch.linalg.svdvals(O.T @ cols)
            out[start:i] = 0.0
            out[start:start + len(sv)] = sv ** 2
            start = i
    return out


def block_measures(H: torch.Tensor, O: torch.Tensor, top: Optional[int]) -> dict:
    ev, V = torch.linalg.eigh(H)
    norm = float(torch.linalg.matrix_norm(H, ord=2))
    overlap_all = aligned_overlaps(ev, V, O, CLUSTER_TOL * norm)
    order = torch.argsort(ev.abs(), descending=True)[:top]
    overlap = overlap_all[order]  # |O^T v|^2 for the top eigenvectors
    Pperp = torch.eye(len(H), dtype=H.dtype) - O @ O.T
    pe, pv = torch.linalg.eigh(Pperp)
    Q = pv[:, pe > 0.5]  # orthonormal basis of ker O^T
    blocks = torch.sort(torch.cat([torch.linalg.eigvalsh(O.T @ H @ O), torch.linalg.eigvalsh(Q.T @ H @ Q)])).values
    return {
        "spectrum_split": float((blocks - ev).abs().max()) / norm,
        "top_eigenvalues": ev[order].tolist(),
        "top_overlap_im_O": overlap.tolist(),
        "top_mixing": float(torch.minimum(overlap, 1 - overlap).max()),
        "off_block": float(torch.linalg.matrix_norm(O.T @ H @ Pperp, ord=2)) / norm,
    }


def candidate_mirrors(p: dict) -> list:
    """The sign flip of every unit (condition: the unit is dead) and the exchange of every pair of units (condition:
    the two are identical), built by symfast.symmetry."""
    h = len(p["c"])
    inc, out = ["W", "b"], [("c", 0)]
    return ([unit_sign_mirror(p, inc, out, j) for j in range(h)] +
            [unit_permutation_mirror(p, inc, out, i, j) for i in range(h) for j in range(i + 1, h)])


def nearest_mirror(p: dict):
    """The mirror whose condition O^T theta = 0 is nearest to p."""
    flat = flatten(p)
    return min(candidate_mirrors(p), key=lambda m: float((m.basis.to(flat.dtype).T @ flat).norm()))


def compute(cfg: dict, progress: bool = True) -> tuple[dict, dict]:
    out = train(cfg, progress)
    X, y, snaps = out["X"], out["y"], out["snapshots"]
    final = snaps[-1][1]
    mirror = nearest_mirror(final)
    O = mirror.basis.to(X.dtype)
    gamma, top = cfg["weight_decay"], cfg["top_eigenvectors"]
    rows = []
    for t, p in snaps:
        H = loss_hessian(p, X, y, gamma)
        rows.append({"step": t, "distance": float((O.T @ flatten(p)).norm()), **block_measures(H, O, top)})
    exact = mirror.symmetric_solution(final)
    ctrl = block_measures(loss_hessian(exact, X, y, gamma), O, top)
    s = np.array([r["distance"] for r in rows])
    off = np.array([r["off_block"] for r in rows])
    use = (s >= SLOPE_RANGE[0]) & (s <= SLOPE_RANGE[1]) & (off > 0)
    slope = float(np.polyfit(np.log(s[use]), np.log(off[use]), 1)[0]) if use.sum() >= 3 else None
    fit = float(((_forward(final, X) - y) ** 2).mean() / (y ** 2).mean())
    summary = {
        "mirror": mirror.description,
        "k": O.shape[1],
        "initial_distance": rows[0]["distance"],
        "final_distance": rows[-1]["distance"],
        "initial_top_mixing": rows[0]["top_mixing"],
        "max_top_mixing": max(r["top_mixing"] for r in rows),
        "final_top_mixing": rows[-1]["top_mixing"],
        "initial_off_block": rows[0]["off_block"],
        "final_off_block": rows[-1]["off_block"],
        "initial_spectrum_split": rows[0]["spectrum_split"],
        "final_spectrum_split": rows[-1]["spectrum_split"],
        "off_block_slope": slope,
        "off_block_slope_points": int(use.sum()),
        "off_block_slope_error": None if slope is None else abs(slope - 1.0),
        "exact_symmetric_off_block": ctrl["off_block"],
        "final_loss_fraction_of_zero_predictor": fit,
    }
    plot = {"H_start": loss_hessian(snaps[0][1], X, y, gamma), "H_end": loss_hessian(final, X, y, gamma), "O": O}
    return {"per_snapshot": rows, "summary": summary}, plot


def in_block_basis(H: torch.Tensor, O: torch.Tensor) -> np.ndarray:
    """H in the orthonormal basis [O, Q], Q a basis of ker O^T: the two diagonal blocks and the coupling."""
    pe, pv = torch.linalg.eigh(torch.eye(len(O), dtype=O.dtype) - O @ O.T)
    B = torch.cat([O, pv[:, pe > 0.5]], 1)
    return (B.T @ H @ B).numpy()


def _plot(rec: dict, plot_data: dict, out_dir: Path) -> str:
    cfg, m = rec["config"], rec["metrics"]
    s = m["summary"]
    rows = m["per_snapshot"]
    fig = new_figure((16, 4.6))
    axes = fig.subplots(1, 4)
    k = s["k"]
    for ax, key, name in ((axes[0], "H_start", "start"), (axes[1], "H_end", "end")):
        H = in_block_basis(plot_data[key], plot_data["O"])
        lim = np.abs(H).max()
        im = ax.imshow(H, cmap="RdBu_r", vmin=-lim, vmax=lim)
        ax.axhline(k - 0.5, color="k", lw=1)
        ax.axvline(k - 0.5, color="k", lw=1)
        ax.set_title(f"Hessian at the {name}, basis [O, ker O^T] (first {k}: im O)", fontsize=9)
        fig.colorbar(im, ax=ax, shrink=0.8)
    steps = [max(r["step"], 1) for r in rows]
    ax = axes[2]
    ov = np.array([r["top_overlap_im_O"] for r in rows])
    labelled = set()
    for j in range(ov.shape[1]):  # colored by the subspace each eigenvector ends in
        inside = bool(ov[-1, j] > 0.5)
        label = None if inside in labelled else ("ends in im O" if inside else "ends in ker O^T")
        labelled.add(inside)
        ax.plot(steps, ov[:, j], "-", lw=1.2, color="tab:red" if inside else "0.45", alpha=0.8, label=label)
    ax.set_xscale("log")
    ax.set_xlabel("gradient-descent step")
    ax.set_ylabel("|O^T v|^2 (overlap with im O; 1 - it: ker O^T)")
    ax.set_ylim(-0.05, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    which = "all" if cfg["top_eigenvectors"] is None else f"top-{cfg['top_eigenvectors']}"
    ax.set_title(f"{which} eigenvectors of H: overlap with im O", fontsize=9)
    ax = axes[3]
    ax.loglog(steps, [max(r["distance"], 1e-300) for r in rows], "o-", ms=3, color="tab:red",
              label="distance s = |O^T theta|")
    ax.loglog(steps, [max(r["off_block"], 1e-300) for r in rows], "s-", ms=3, color="tab:blue",
              label="|O^T H (I - O O^T)| / |H|")
    ax.loglog(steps, [max(r["top_mixing"], 1e-300) for r in rows], "^-", ms=3, color="tab:green",
              label="mixing of the top eigenvectors")
    ax.set_xlabel("gradient-descent step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    slope = "n/a" if s["off_block_slope"] is None else f"{s['off_block_slope']:.2f}"
    ax.set_title(f"off-diagonal block vs s: log-log slope {slope}", fontsize=9)
    fig.suptitle(f"Fig. 2-left: block Hessian near a symmetric solution (tanh net, {cfg['hidden']} units, weight decay "
                 f"{cfg['weight_decay']:g}, {cfg['steps']:,} GD steps): {rec['verdict']}", fontsize=11,
                 color=verdict_color(rec["verdict"]))
    return save_figure(fig, out_dir, "fig2.png")


def _headline(metrics: dict, cfg: dict) -> str:
    s = metrics["summary"]
    slope = "n/a" if s["off_block_slope"] is None else f"{s['off_block_slope']:.2f}"
    which = "all" if cfg["top_eigenvectors"] is None else f"top-{cfg['top_eigenvectors']}"
    return (f"{s['mirror']}: s {s['initial_distance']:.1e} -> {s['final_distance']:.1e}; {which} "
            f"eigenvectors' mixing {s['initial_top_mixing']:.1e} -> {s['final_top_mixing']:.1e}, off-block "
            f"{s['initial_off_block']:.1e} -> {s['final_off_block']:.1e} (slope vs s {slope})")


def _deviations(cfg: dict) -> list[dict]:
    return [deviation("model and data", "an illustration (Fig. 2 computes no Hessian)",
                      "tanh network with a surplus unit, two-neuron teacher, full-batch GD with weight decay",
                      "a model small enough for the exact Hessian (torch.func.hessian) at every snapshot")]


def run(out_dir: str | Path, *, quick: bool = True, seed: int = 0, progress: bool = True,
        config: Optional[dict] = None) -> dict:
    """Train towards a symmetric solution and follow the Hessian's blocks; writes fig2.png, result.json, report.md."""
    return run_experiment(sys.modules[__name__], out_dir, quick=quick, seed=seed, progress=progress, config=config,
                          headline=_headline, deviations=_deviations,
                          notes=["The mirror is the one (sign flip of a unit or exchange of two units) whose condition "
                                 "is nearest at the end of training; the same O is used at every snapshot.",
                                 "Revised after a pilot run (before the recorded runs): weight decay 0.05 -> 0.1 (at "
                                 "0.05 the network ended on a symmetric condition for 1 of 4 seeds, at 0.1 for 4 of "
                                 "4), exchange mirrors added to the candidates (the units merged rather than died), "
                                 "and eigenvectors of repeated eigenvalues compared as eigenspaces, with the "
                                 "spectrum-union check added (three identical units repeat eigenvalues across the "
                                 "blocks, so single eigenvectors of a repeated eigenvalue mixed them arbitrarily)."])
