"""Sec. 4.5: L1 equivalence. DCS with weight decay traces scikit-learn's Lasso path.

Paper (Sec. 4.5, Sec. 4.3): "every mirror symmetry plus weight decay has an L1 equivalent"; "when
both weight decay and rescaling symmetries are present, the solutions are sparse and identical to
lasso (Ziyin & Wang, 2023)". For theta = w * u (``symfast.dcs(w, u)``), AM-GM gives
min_{w * u = theta} alpha (|w|^2 + |u|^2) = 2 alpha |theta|_1, so

    min_{w, u} 1/(2n) |y - X (w * u)|^2 + alpha (|w|^2 + |u|^2)
  = min_theta  1/(2n) |y - X theta|^2 + 2 alpha |theta|_1,

which is scikit-learn's Lasso objective (its data term carries the 1/(2n)) with
``sklearn alpha = 2 * alpha``. The run trains DCS by full-batch L-BFGS (autograd through ``symfast.dcs``),
from a fresh random start at every alpha of the path, and compares with ``sklearn.linear_model.lasso_path``
(coordinate descent, tolerance 1e-12): coefficients, supports, objective values, and the lasso KKT
conditions at the DCS solution (independent of scikit-learn).

Data: scikit-learn's bundled diabetes data (n = 442, d = 10; columns and target standardized, no
intercept) and a synthetic d > n problem (n = 60, d = 100, 6 true nonzeros) where the lasso is the
only sensible estimator.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import torch
from tqdm import tqdm

import symfast

from .common import apply_overrides, run_experiment, Criterion, new_figure, save_figure, verdict_color

EXPERIMENT = "lasso"
TITLE = "Sec. 4.5: L1 equivalence - DCS (theta = w*u) with weight decay vs scikit-learn's Lasso path"
CLAIM = (
    "Sec. 4.5: 'every mirror symmetry plus weight decay has an L1 equivalent'; Sec. 4.3: 'when both weight decay "
    "and rescaling symmetries are present, the solutions are sparse and identical to lasso (Ziyin & Wang, 2023)'. "
    "Here: weight decay alpha on (w, u) with theta = w * u equals sklearn's Lasso with alpha_sklearn = 2 alpha."
)
CLAIM_SHORT = "weight decay alpha on (w,u), theta=w*u, gives sklearn's Lasso path at alpha_sklearn = 2 alpha"

COEF_TOL = 1e-4
SUPPORT_TOL = 1e-6
OBJ_RTOL = 1e-7
KKT_TOL = 1e-5

CRITERIA = [
    Criterion("summary.max_coef_abs_diff", "<=", COEF_TOL,
              "DCS coefficients equal sklearn's at every alpha of every path (max |difference|)"),
    Criterion("summary.support_mismatches", "==", 0,
              f"same supports: no coefficient nonzero in one and zero in the other (|theta| > {SUPPORT_TOL:g})"),
    Criterion("summary.max_objective_rel_excess", "<=", OBJ_RTOL,
              "the DCS solution's lasso objective is no higher than sklearn's (relative excess)"),
    Criterion("summary.max_kkt_violation", "<=", KKT_TOL,
              "the DCS solution satisfies the lasso optimality (KKT) conditions, checked without sklearn"),
]


def make_config(quick: bool = True, seed: int = 0, **overrides) -> dict:
    cfg = {
        "quick": quick,
        "seed": seed,
        "datasets": ["diabetes", "synthetic"],
        "n_alphas": 12 if quick else 40,
        "alpha_min_ratio": {"diabetes": 1e-3, "synthetic": 3e-2},
        "alpha_max_ratio": 0.95,
        "lbfgs_max_iter": 2000 if quick else 5000,
        "lbfgs_rounds": 2 if quick else 4,
        "init_scale": 0.5,
        "dtype": "float64",
        "sklearn_tol": 1e-12,
        "sklearn_max_iter": 200_000,
        "support_tol": SUPPORT_TOL,
        "synthetic": {"n": 60, "d": 100, "nonzeros": 6, "noise_std": 0.5},
        "dcs_loss": "1/(2n) |y - X symfast.dcs(w, u)|^2 + alpha (|w|^2 + |u|^2), alpha = alpha_sklearn / 2",
        "optimizer": "full-batch L-BFGS (torch.optim.LBFGS, strong Wolfe, history 50), lbfgs_rounds x lbfgs_max_iter "
        "iterations, per alpha from a fresh start w, u ~ init_scale * N(0, 1) (independent: never on a mirror); "
        "the synthetic path stops at alpha_min_ratio 3e-2, before the d > n problem nears interpolation, where "
        "the factorized problem is too ill-conditioned to solve to 1e-4 in CPU-minutes",
        "sklearn": "sklearn.linear_model.lasso_path on the same standardized data (objective 1/(2n)|y - X theta|^2 + "
        "alpha |theta|_1)",
    }
    apply_overrides(cfg, overrides)
    return cfg


def load_dataset(name: str, cfg: dict, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, dict]:
    dt = torch.float64
    if name == "diabetes":
        from sklearn.datasets import load_diabetes

        Xn, yn = load_diabetes(return_X_y=True)
        X, y = torch.tensor(Xn, dtype=dt), torch.tensor(yn, dtype=dt)
        info = {"source": "sklearn.datasets.load_diabetes (bundled)", "n": X.shape[0], "d": X.shape[1]}
    elif name == "synthetic":
        s = cfg["synthetic"]
        X = torch.randn(s["n"], s["d"], generator=g, dtype=dt)
        beta = torch.zeros(s["d"], dtype=dt)
        idx = torch.randperm(s["d"], generator=g)[: s["nonzeros"]]
        signs = torch.randn(s["nonzeros"], generator=g, dtype=dt).sign()
        beta[idx] = signs * (1 + torch.rand(s["nonzeros"], generator=g, dtype=dt))  # |beta_i| in [1, 2)
        y = X @ beta + s["noise_std"] * torch.randn(s["n"], generator=g, dtype=dt)
        info = {"source": "Gaussian design", **s, "true_support": sorted(idx.tolist())}
    else:
        raise ValueError(f"unknown dataset {name!r}")
    X = (X - X.mean(0)) / X.std(0)
    y = (y - y.mean()) / y.std()
    return X, y, info


def sklearn_path(X: torch.Tensor, y: torch.Tensor, alphas: list[float], cfg: dict) -> torch.Tensor:
    """(K, d) lasso coefficients, in the order of ``alphas``."""
    import numpy as np
    from sklearn.linear_model import lasso_path

    a = np.asarray(alphas, dtype=float)
    order = np.argsort(-a)  # lasso_path wants decreasing alphas
    _, coefs, _ = lasso_path(X.numpy(), y.numpy(), alphas=a[order], tol=cfg["sklearn_tol"],
                             max_iter=cfg["sklearn_max_iter"])
    out = np.empty((len(a), X.shape[1]))
    out[order] = coefs.T
    return torch.tensor(out, dtype=torch.float64)


def dcs_path(X: torch.Tensor, y: torch.Tensor, alphas: list[float], cfg: dict, g: torch.Generator,
             progress: bool, desc: str) -> torch.Tensor:
    """(K, d) theta = w * u minimizing the DCS objective with weight decay alpha_sklearn / 2, per alpha.

    L-BFGS (strong Wolfe) in float64 through ``symfast.dcs``, from a fresh random start at every alpha.
    Not warm-started along the path on purpose: a coordinate that reached w_i = u_i = 0 at a larger
    alpha sits on the stationary condition of Theorem 1 and could never re-enter the support.
    """
    n, d = X.shape
    out = []
    for a in tqdm(alphas, desc=desc, disable=not progress, leave=False):
        wd = a / 2  # the 2 alpha factor
        w = (torch.randn(d, generator=g, dtype=torch.float64) * cfg["init_scale"]).requires_grad_()
        u = (torch.randn(d, generator=g, dtype=torch.float64) * cfg["init_scale"]).requires_grad_()
        opt = torch.optim.LBFGS([w, u], lr=1.0, max_iter=cfg["lbfgs_max_iter"], tolerance_grad=1e-14,
                                tolerance_change=1e-16, history_size=50, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = (X @ symfast.dcs(w, u) - y).pow(2).sum() / (2 * n) + wd * (w.pow(2).sum() + u.pow(2).sum())
            loss.backward()
            return loss

        for _ in range(cfg["lbfgs_rounds"]):
            opt.step(closure)
        out.append(symfast.dcs(w, u).detach())
    return torch.stack(out)


def lasso_objective(X, y, theta, alphas) -> torch.Tensor:
    n = X.shape[0]
    a = torch.tensor(alphas, dtype=torch.float64)
    return (theta @ X.T - y).pow(2).sum(-1) / (2 * n) + a * theta.abs().sum(-1)


def kkt_violation(X, y, theta, alphas, support_tol: float) -> torch.Tensor:
    """Per alpha: max over coordinates of the lasso KKT violation (0 at the exact solution).

    grad = X^T (X theta - y) / n; nonzero theta_i: grad_i = -alpha sign(theta_i); zero: |grad_i| <= alpha.
    """
    n = X.shape[0]
    a = torch.tensor(alphas, dtype=torch.float64).view(-1, 1)
    grad = (theta @ X.T - y) @ X / n
    nz = theta.abs() > support_tol
    v_nz = (grad + a * theta.sign()).abs()
    v_z = (grad.abs() - a).clamp_min(0)
    return torch.where(nz, v_nz, v_z).amax(-1)


def compute(cfg: dict, progress: bool) -> tuple[dict, dict]:
    g = torch.Generator().manual_seed(int(cfg["seed"]))
    per_ds, plot = {}, {}
    for name in cfg["datasets"]:
        X, y, info = load_dataset(name, cfg, g)
        n, d = X.shape
        a_max = float((X.T @ y).abs().max() / n)  # smallest alpha with the all-zero solution
        K = cfg["n_alphas"]
        lo, hi = a_max * cfg["alpha_min_ratio"][name], a_max * cfg["alpha_max_ratio"]
        alphas = [hi * (lo / hi) ** (i / (K - 1)) for i in range(K)]
        ref = sklearn_path(X, y, alphas, cfg)
        th = dcs_path(X, y, alphas, cfg, g, progress, f"lasso DCS {name}")
        tol = cfg["support_tol"]
        diff = (th - ref).abs()
        sup_d, sup_r = th.abs() > tol, ref.abs() > tol
        obj_d, obj_r = lasso_objective(X, y, th, alphas), lasso_objective(X, y, ref, alphas)
        kkt_d = kkt_violation(X, y, th, alphas, tol)
        kkt_r = kkt_violation(X, y, ref, alphas, tol)
        per_ds[name] = {
            "data": info,
            "alpha_max": a_max,
            "alphas_sklearn": alphas,
            "alphas_dcs_weight_decay": [a / 2 for a in alphas],
            "max_coef_abs_diff": float(diff.max()),
            "coef_abs_diff_per_alpha": diff.amax(-1).tolist(),
            "support_mismatches": int((sup_d != sup_r).sum()),
            "support_size_dcs": sup_d.sum(-1).tolist(),
            "support_size_sklearn": sup_r.sum(-1).tolist(),
            "max_objective_rel_excess": float(((obj_d - obj_r) / obj_r.abs()).max()),
            "max_kkt_violation_dcs": float(kkt_d.max()),
            "max_kkt_violation_sklearn": float(kkt_r.max()),
            "dcs_exact_zero_frac": float((th == 0).double().mean()),
            "dcs_min_abs_off_support": float(th.abs()[~sup_r].max()) if (~sup_r).any() else None,
        }
        plot[name] = {"alphas": alphas, "dcs": th, "ref": ref}
    summary = {
        "max_coef_abs_diff": max(v["max_coef_abs_diff"] for v in per_ds.values()),
        "support_mismatches": sum(v["support_mismatches"] for v in per_ds.values()),
        "max_objective_rel_excess": max(v["max_objective_rel_excess"] for v in per_ds.values()),
        "max_kkt_violation": max(v["max_kkt_violation_dcs"] for v in per_ds.values()),
        "max_kkt_violation_sklearn": max(v["max_kkt_violation_sklearn"] for v in per_ds.values()),
        "path_points": sum(len(v["alphas_sklearn"]) for v in per_ds.values()),
    }
    return {"per_dataset": per_ds, "summary": summary}, plot


def _plot(rec: dict, plot: dict, out_dir: Path) -> str:
    import matplotlib.cm as cm
    import numpy as np

    names = list(plot)
    fig = new_figure((6.2 * len(names) + 0.5, 9.4))
    axes = fig.subplots(2, len(names), squeeze=False, gridspec_kw={"height_ratios": [1.6, 1.0]})
    for j, name in enumerate(names):
        p = plot[name]
        a = np.asarray(p["alphas"])
        ref, th = p["ref"].numpy(), p["dcs"].numpy()
        m = rec["metrics"]["per_dataset"][name]
        ax = axes[0, j]
        active = np.where(np.abs(ref).max(0) > 0)[0]
        cols = cm.tab10(np.linspace(0, 1, 10))
        for k, i in enumerate(active):
            c = cols[k % 10]
            ax.plot(a, ref[:, i], color=c, lw=1.6, label="sklearn lasso_path" if k == 0 else None)
            ax.plot(a, th[:, i], "o", color=c, ms=4.5, mfc="none", mew=1.3,
                    label=r"DCS $w\odot u$, weight decay $\alpha_{sk}/2$" if k == 0 else None)
        ax.set_xscale("log")
        ax.invert_xaxis()
        ax.set_xlabel(r"scikit-learn alpha $\alpha_{sk}$ (= 2 x DCS weight decay)")
        ax.set_ylabel(r"coefficient $\theta_i$")
        info = m["data"]
        ax.set_title(f"{name}: n={info['n']}, d={info['d']} ({len(active)} coefficients ever nonzero)\n"
                     f"max |DCS - sklearn| = {m['max_coef_abs_diff']:.1e}, "
                     f"support mismatches: {m['support_mismatches']}",
                     fontsize=10)
        ax.legend(fontsize=8, loc="upper left")
        ax.grid(alpha=0.3)

        ax = axes[1, j]
        ax.plot(a, m["support_size_sklearn"], "-", color="k", lw=2, label="support size: sklearn")
        ax.plot(a, m["support_size_dcs"], "o", color="tab:red", mfc="none", ms=6, mew=1.4, label="support size: DCS")
        ax.set_xscale("log")
        ax.invert_xaxis()
        ax.set_xlabel(r"scikit-learn alpha $\alpha_{sk}$")
        ax.set_ylabel(f"# coefficients with |theta| > {rec['config']['support_tol']:g}")
        ax2 = ax.twinx()
        ax2.semilogy(a, np.maximum(m["coef_abs_diff_per_alpha"], 1e-17), "s--", color="tab:blue", ms=4,
                     label="max |DCS - sklearn| (right axis)")
        ax2.set_ylabel("max |DCS - sklearn| at this alpha", color="tab:blue")
        ax2.set_ylim(1e-16, 1)
        h1, l1 = ax.get_legend_handles_labels()
        h2, l2 = ax2.get_legend_handles_labels()
        ax.legend(h1 + h2, l1 + l2, fontsize=8, loc="upper left")
        ax.grid(alpha=0.3)
    from matplotlib.ticker import NullFormatter

    for j, name in enumerate(names):
        a = plot[name]["alphas"]
        lo, hi = min(a), max(a)
        ticks = [m * 10.0**e for e in range(-6, 2) for m in (1, 2, 5) if lo <= m * 10.0**e <= hi]
        for ax in axes[:, j]:
            ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
            ax.xaxis.set_minor_formatter(NullFormatter())
    s = rec["metrics"]["summary"]
    fig.suptitle(
        f"Sec. 4.5: weight decay on (w, u) with theta = w*u is the lasso (sklearn alpha = 2 x weight decay): "
        f"{rec['verdict']}\n(max coefficient difference {s['max_coef_abs_diff']:.1e}, "
        f"KKT violation {s['max_kkt_violation']:.1e}, "
        f"{s['support_mismatches']} support mismatches over {s['path_points']} path points)",
        fontsize=11, color=verdict_color(rec["verdict"]),
    )
    return save_figure(fig, out_dir, "lasso.png")


def _headline(metrics: dict, cfg: dict) -> str:
    s = metrics["summary"]
    headline = (
        f"{s['path_points']} path points: max |DCS - sklearn| {s['max_coef_abs_diff']:.1e}, "
        f"{s['support_mismatches']} support mismatches, KKT violation {s['max_kkt_violation']:.1e}"
    )
    return headline


NOTES = [
    "The factor 2: min over w * u = theta of alpha (|w|^2 + |u|^2) is 2 alpha |theta|_1, and "
    "sklearn's data term is 1/(2n)|y - X theta|^2, so DCS weight decay alpha matches sklearn "
    "alpha 2 alpha.",
    "The optimizer reaches the zeros only asymptotically (w_i, u_i shrink geometrically towards the "
    f"symmetric point); supports are compared at |theta| > {SUPPORT_TOL:g}.",
]


def run(out_dir: str | Path, *, quick: bool = True, seed: int = 0, progress: bool = True,
        config: Optional[dict] = None) -> dict:
    """Fit both paths; writes lasso.png, result.json and report.md into ``out_dir``."""
    return run_experiment(sys.modules[__name__], out_dir, quick=quick, seed=seed, progress=progress,
                          config=config, headline=_headline, notes=NOTES)
