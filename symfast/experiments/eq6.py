"""Eq. 6: the Hessian of the DCS two-layer linear net at the symmetric point w = u = 0.

Paper (Sec. 4.2): for the two-layer linear net with scalar input and output,
l(w, u) = 1/2 (x sum_i u_i w_i - y)^2, each pair (w_i, u_i) has the rescaling symmetry, hence the two
mirrors (1, 1) and (1, -1). Theorem 4 part 2 then predicts, from the symmetry alone, that at
w = u = 0 the Hessian splits into d 2x2 blocks with eigenvectors (1, 1)/sqrt2 and (1, -1)/sqrt2 for
*every* sample; the direct computation gives the blocks [[0, -xy], [-xy, 0]] (eq. 6), eigenvalues
-xy on (1, 1) and +xy on (1, -1). (The paper lists "(1, 1) and (1, -1) with eigenvalues xy and -xy";
the pairing is the other way round, the set of eigenvalues is the same.)

What is measured (the Hessian always through ``symfast.dcs``, by ``torch.func.hessian`` =
forward-over-reverse, in float64; the closed forms are written out independently):

* per sample: the full 2d x 2d Hessian against eq. 6 entry by entry, its spectrum against
  {+xy (d times), -xy (d times)}, the residuals |H n - lambda n| of the 2d predicted eigenvectors, and
  the distance between the predicted and computed eigenspaces (projector difference, which is
  well defined even though each eigenvalue is d-fold degenerate);
* the empirical loss (mean over the samples): the same with xy replaced by mean(xy);
* the general DCS op theta = (1 - m) v + m w u (eq. 10) at w = u = 0 with v != 0 and a random mask:
  the predicted blocks [[0, m_i g], [m_i g, 0]] with g = x (x sum theta - y), no coupling between
  (w, u) and v, and the v-block x^2 (1 - m)(1 - m)^T.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import torch
from tqdm import tqdm

import symfast

from .common import apply_overrides, run_experiment, Criterion, new_figure, save_figure, verdict_color

EXPERIMENT = "eq6"
TITLE = "Eq. 6 / Sec. 4.2: Hessian of the DCS two-layer linear net at w = u = 0"
CLAIM = (
    "Sec. 4.2, eq. 6: for l = 1/2 (x sum_i u_i w_i - y)^2 'the theory predicts that when u ~ w ~ 0, the Hessian "
    "consists of d 2x2 symmetric matrices with (1, 1) and (1, -1) being the eigenvectors'; directly, the only "
    "nonvanishing entries are d^2 l / dw_i du_i = -xy, 'eigenvalues xy and -xy, agreeing with the theory'."
)
CLAIM_SHORT = "Hessian at w=u=0 is d 2x2 blocks [[0,-xy],[-xy,0]]: eigenvectors (1,+-1), eigenvalues -+xy"

TOL = 1e-12  # float64: every quantity below is exact up to a few roundings

CRITERIA = [
    Criterion("per_sample.max_abs_entry_error", "<=", TOL,
              "every per-sample Hessian equals eq. 6 entry by entry"),
    Criterion("per_sample.max_eigenvalue_error", "<=", TOL,
              "per-sample spectrum = {+xy, -xy}, each d times"),
    Criterion("per_sample.max_eigenvector_residual", "<=", TOL,
              "(1,1)/sqrt2 and (1,-1)/sqrt2 of every pair are eigenvectors, |H n - lambda n|, for every sample"),
    Criterion("per_sample.max_eigenspace_distance", "<=", 1e-9,
              "the computed eigenspaces of +xy and -xy are spanned by the predicted vectors (projector distance)"),
    Criterion("empirical.max_eigenvalue_error", "<=", TOL,
              "the empirical-loss Hessian has eigenvalues +-mean(xy) on the same eigenvectors"),
    Criterion("masked_dcs.max_abs_entry_error", "<=", TOL,
              "general DCS (mask, v != 0): blocks [[0, m_i g], [m_i g, 0]], no (w,u)-v coupling"),
]


def make_config(quick: bool = True, seed: int = 0, **overrides) -> dict:
    cfg = {
        "quick": quick,
        "seed": seed,
        "d": 8 if quick else 64,
        "samples": 64 if quick else 512,
        "masked_d": 8 if quick else 32,
        "masked_samples": 16 if quick else 64,
        "dtype": "float64",
        "data": "x ~ N(0, 1), y = 0.5 x + N(0, 1) (scalar input and output)",
        "loss": "l(w, u) = 1/2 (x * sum(symfast.dcs(w, u)) - y)^2 at w = u = 0",
        "hessian": "torch.func.hessian (forward-over-reverse through symfast.dcs), vmapped over samples",
        "ordering": "parameters flattened as (w_1, u_1, w_2, u_2, ...)",
        "figure_d": 4,
    }
    apply_overrides(cfg, overrides)
    return cfg


# --------------------------------------------------------------- the Hessians
def _pair_loss(p: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """l for one sample; p is (2d,) = (w_1, u_1, ..., w_d, u_d)."""
    wu = p.view(-1, 2)
    return 0.5 * (x * symfast.dcs(wu[:, 0], wu[:, 1]).sum() - y) ** 2


def per_sample_hessians(d: int, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(n, 2d, 2d) Hessians at w = u = 0 through symfast.dcs."""
    p0 = torch.zeros(2 * d, dtype=x.dtype)
    return torch.func.vmap(torch.func.hessian(_pair_loss), in_dims=(None, 0, 0))(p0, x, y)


def empirical_hessian(d: int, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    p0 = torch.zeros(2 * d, dtype=x.dtype)

    def loss(p):
        return torch.func.vmap(_pair_loss, in_dims=(None, 0, 0))(p, x, y).mean()

    return torch.func.hessian(loss)(p0)


def eq6_hessian(d: int, xy: float | torch.Tensor) -> torch.Tensor:
    """Eq. 6 written out: d blocks [[0, -xy], [-xy, 0]] in the (w_1, u_1, ...) ordering."""
    block = torch.tensor([[0.0, -1.0], [-1.0, 0.0]], dtype=torch.float64) * float(xy)
    return torch.block_diag(*([block] * d))


def predicted_eigvecs(d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(plus, minus): columns (e_wi + e_ui)/sqrt2 and (e_wi - e_ui)/sqrt2, shape (2d, d) each."""
    plus = torch.zeros(2 * d, d, dtype=torch.float64)
    minus = torch.zeros(2 * d, d, dtype=torch.float64)
    r = 2.0**-0.5
    for i in range(d):
        plus[2 * i, i], plus[2 * i + 1, i] = r, r
        minus[2 * i, i], minus[2 * i + 1, i] = r, -r
    return plus, minus


def _eigen_checks(H: torch.Tensor, xy: float, d: int) -> dict:
    """Compare one symmetric Hessian with the predicted eigen-structure (eigenvalue -xy on (1,1), +xy on (1,-1))."""
    plus, minus = predicted_eigvecs(d)
    evals, evecs = torch.linalg.eigh(H)
    want = torch.sort(torch.tensor([-xy] * d + [xy] * d, dtype=torch.float64)).values
    res_plus = (H @ plus - (-xy) * plus).norm(dim=0).max()
    res_minus = (H @ minus - xy * minus).norm(dim=0).max()
    # Eigenspaces: the computed eigenvectors with eigenvalue near +-xy span the same space as the predicted ones.
    dist = 0.0
    if abs(xy) > 1e-8:  # otherwise the two eigenspaces merge (H = 0) and the split is not defined
        for sign, pred in ((-1.0, plus), (1.0, minus)):
            sel = (evals - sign * xy).abs() < 1e-6 * max(1.0, abs(xy))
            V = evecs[:, sel]
            dist = max(dist, float((V @ V.T - pred @ pred.T).abs().max()) if V.shape[1] == d else float("inf"))
    return {
        "eigenvalue_error": float((evals - want).abs().max()),
        "eigenvector_residual": float(max(res_plus, res_minus)),
        "eigenspace_distance": dist,
        "eigenvalues": evals,
    }


def masked_dcs_check(d: int, n: int, g: torch.Generator) -> dict:
    """Eq. 10's full op at w = u = 0, v != 0, random mask: Hessian in (w, u, v) against the closed form."""
    dt = torch.float64
    mask = (torch.rand(d, generator=g) < 0.5).to(dt)
    mask[0], mask[-1] = 1.0, 0.0  # both kinds present
    v = torch.randn(d, generator=g, dtype=dt)
    x = torch.randn(n, generator=g, dtype=dt)
    y = 0.5 * x + torch.randn(n, generator=g, dtype=dt)

    def loss(p, x, y):
        w, u, vv = p[:d], p[d : 2 * d], p[2 * d :]
        return 0.5 * (x * symfast.dcs(w, u, vv, mask).sum() - y) ** 2

    p0 = torch.cat([torch.zeros(2 * d, dtype=dt), v])
    Hs = torch.func.vmap(torch.func.hessian(loss), in_dims=(None, 0, 0))(p0, x, y)
    theta0 = ((1 - mask) * v).sum()
    err = 0.0
    offdiag = 0.0
    for k in range(n):
        gk = float(x[k] * (x[k] * theta0 - y[k]))  # dl/dtheta_i, the same for every i
        want = torch.zeros(3 * d, 3 * d, dtype=dt)
        idx = torch.arange(d)
        want[idx, d + idx] = mask * gk
        want[d + idx, idx] = mask * gk
        want[2 * d :, 2 * d :] = float(x[k]) ** 2 * torch.outer(1 - mask, 1 - mask)
        err = max(err, float((Hs[k] - want).abs().max()))
        offdiag = max(offdiag, float(Hs[k][: 2 * d, 2 * d :].abs().max()))
    return {"max_abs_entry_error": err, "max_wu_v_coupling": offdiag, "d": d, "samples": n,
            "masked_coordinates": int(mask.sum())}


# ---------------------------------------------------------------------- run
def compute(cfg: dict, progress: bool = True) -> tuple[dict, dict]:
    g = torch.Generator().manual_seed(int(cfg["seed"]))
    d, n = cfg["d"], cfg["samples"]
    dt = torch.float64
    x = torch.randn(n, generator=g, dtype=dt)
    y = 0.5 * x + torch.randn(n, generator=g, dtype=dt)

    steps = tqdm(total=3, desc="eq6 Hessians", disable=not progress, leave=False)
    Hs = per_sample_hessians(d, x, y)
    steps.update()
    entry_err, ev_err, vec_res, space = 0.0, 0.0, 0.0, 0.0
    xy = (x * y).tolist()
    for k in range(n):
        entry_err = max(entry_err, float((Hs[k] - eq6_hessian(d, xy[k])).abs().max()))
        c = _eigen_checks(Hs[k], xy[k], d)
        ev_err = max(ev_err, c["eigenvalue_error"])
        vec_res = max(vec_res, c["eigenvector_residual"])
        space = max(space, c["eigenspace_distance"])
    # Off-pair entries: the Hessian couples only w_i with u_i.
    pair_mask = torch.block_diag(*([torch.ones(2, 2, dtype=dt)] * d)).bool()
    off_pair = float(Hs[:, ~pair_mask].abs().max()) if d > 1 else 0.0

    He = empirical_hessian(d, x, y)
    steps.update()
    mxy = float((x * y).mean())
    ce = _eigen_checks(He, mxy, d)
    masked = masked_dcs_check(cfg["masked_d"], cfg["masked_samples"], g)
    steps.update()
    steps.close()

    # Small example for the figure: one sample's Hessian and the eigenvalues of all samples.
    fd = cfg["figure_d"]
    H_small = per_sample_hessians(fd, x[:1], y[:1])[0]
    ev_small = torch.linalg.eigvalsh(Hs)  # (n, 2d), ascending
    metrics = {
        "per_sample": {
            "samples": n,
            "d": d,
            "max_abs_entry_error": entry_err,
            "max_off_pair_entry": off_pair,
            "max_eigenvalue_error": ev_err,
            "max_eigenvector_residual": vec_res,
            "max_eigenspace_distance": space,
        },
        "empirical": {
            "mean_xy": mxy,
            "eigenvalues": [float(v) for v in torch.unique(torch.round(ce["eigenvalues"], decimals=10))],
            "max_eigenvalue_error": ce["eigenvalue_error"],
            "max_eigenvector_residual": ce["eigenvector_residual"],
            "max_eigenspace_distance": ce["eigenspace_distance"],
            "max_abs_entry_error": float((He - eq6_hessian(d, mxy)).abs().max()),
        },
        "masked_dcs": masked,
    }
    plot_data = {"H_small": H_small, "x0y0": xy[0], "xy": x * y, "evals": ev_small, "fd": fd}
    return metrics, plot_data


def _plot(rec: dict, pd: dict, out_dir: Path) -> str:
    fig = new_figure((13.5, 4.6))
    axes = fig.subplots(1, 3, gridspec_kw={"width_ratios": [1.0, 1.15, 1.0]})
    fd = pd["fd"]

    # (1) one sample's Hessian as a heatmap.
    ax = axes[0]
    H = pd["H_small"].numpy()
    lim = max(abs(H).max(), 1e-12)
    im = ax.imshow(H, cmap="RdBu_r", vmin=-lim, vmax=lim)
    labels = [f"${c}_{i + 1}$" for i in range(fd) for c in ("w", "u")]
    ax.set_xticks(range(2 * fd), labels, fontsize=8)
    ax.set_yticks(range(2 * fd), labels, fontsize=8)
    for i in range(2 * fd):
        for j in range(2 * fd):
            if abs(H[i, j]) > 1e-12:
                ax.text(j, i, f"{H[i, j]:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if abs(H[i, j]) > 0.5 * lim else "black")
    fig.colorbar(im, ax=ax, shrink=0.8, label="Hessian entry")
    ax.set_title(f"one sample's Hessian at w = u = 0 (d = {fd})\n"
                 f"torch.func.hessian through symfast.dcs; -xy = {-pd['x0y0']:.2f}", fontsize=9.5)

    # (2) computed eigenvalues vs the closed form +-xy, every sample.
    ax = axes[1]
    xy = pd["xy"].numpy()
    ev = pd["evals"].numpy()
    d = ev.shape[1] // 2
    lo, hi = float(min(xy.min(), -xy.max())), float(max(xy.max(), -xy.min()))
    ax.plot([lo, hi], [lo, hi], color="0.6", lw=1, zorder=1, label="y = x")
    import numpy as np

    top = np.sort(ev, axis=1)[:, d:]  # the d largest per sample
    bot = np.sort(ev, axis=1)[:, :d]
    pos = np.maximum(xy, -xy)
    neg = np.minimum(xy, -xy)
    ax.scatter(np.repeat(pos, d), top.ravel(), s=12, color="tab:red", zorder=3,
               label=r"computed (top $d$) vs $|xy|$")
    ax.scatter(np.repeat(neg, d), bot.ravel(), s=12, color="tab:blue", marker="s", zorder=2,
               label=r"computed (bottom $d$) vs $-|xy|$")
    ax.set_xlabel(r"closed form (eq. 6): $\pm x y$ of the sample")
    ax.set_ylabel("eigenvalue of the computed Hessian")
    ax.legend(fontsize=8, loc="upper left")
    m = rec["metrics"]["per_sample"]
    ax.set_title(f"all {m['samples']} samples, d = {m['d']}: max |error| = {m['max_eigenvalue_error']:.1e}",
                 fontsize=9.5)
    ax.grid(alpha=0.3)

    # (3) residuals of the predicted eigenvectors and the other checks, log scale.
    ax = axes[2]
    checks = rec["checks"]
    names = ["entries vs eq. 6", "spectrum", "eigvec residual", "eigenspace dist.", "empirical loss", "masked DCS"]
    vals = [max(c["measured"], 1e-18) for c in checks]
    thr = [c["threshold"] for c in checks]
    colors = ["tab:green" if c["passed"] else "tab:red" for c in checks]
    ax.barh(range(len(vals)), vals, color=colors)
    ax.scatter(thr, range(len(vals)), marker="|", s=300, color="k", label="threshold", zorder=3)
    ax.set_yticks(range(len(vals)), names, fontsize=8.5)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlim(1e-19, 1e-6)
    ax.set_xlabel("max |computed - closed form|\n(float64; an exact 0 is drawn at 1e-18)", fontsize=9)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title("each check of the criterion (green: passed)", fontsize=9.5)
    ax.grid(alpha=0.3, axis="x")

    fig.suptitle(
        f"Eq. 6: the Hessian at the symmetric point is d 2x2 blocks with eigenvectors (1, 1) and (1, -1), "
        f"eigenvalues -xy and +xy: {rec['verdict']}",
        fontsize=11, color=verdict_color(rec["verdict"]),
    )
    return save_figure(fig, out_dir, "eq6.png")


def _headline(metrics: dict, cfg: dict) -> str:
    m = metrics
    headline = (
        f"{m['per_sample']['samples']} samples, d={m['per_sample']['d']}: max entry error "
        f"{m['per_sample']['max_abs_entry_error']:.1e}, eigenvalue error "
        f"{m['per_sample']['max_eigenvalue_error']:.1e}, "
        f"eigenvector residual {m['per_sample']['max_eigenvector_residual']:.1e}; masked DCS "
        f"{m['masked_dcs']['max_abs_entry_error']:.1e}"
    )
    return headline


NOTES = [
    "The paper's sentence pairs (1, 1) with xy and (1, -1) with -xy; eq. 6 itself gives -xy on (1, 1) and "
    "+xy on (1, -1). The check uses eq. 6's pairing; the set of eigenvalues is the paper's.",
    "Each eigenvalue is d-fold degenerate, so eigh's individual eigenvectors are arbitrary within each "
    "eigenspace: the check compares eigenspaces (projectors) and the residuals |H n - lambda n| of the "
    "predicted vectors, not eigh's vectors one by one.",
]


def run(out_dir: str | Path, *, quick: bool = True, seed: int = 0, progress: bool = True,
        config: Optional[dict] = None) -> dict:
    """Compute the Hessians, compare with eq. 6; writes eq6.png, result.json and report.md into ``out_dir``."""
    return run_experiment(sys.modules[__name__], out_dir, quick=quick, seed=seed, progress=progress,
                          config=config, headline=_headline, notes=NOTES)
