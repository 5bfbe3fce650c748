"""Figure 4 (App. A.1): stationary conditions of two 2-D landscapes, with SGD trajectories.

Paper: "Left: L = (wu - 1)^2. Here, u = w and u = -w are the stationary conditions caused by the
rescaling symmetry. Right: theta = (u, w) and L = -|theta|^2 + |theta|^4. Here, the stationary
condition caused by the rotation symmetry is every straight line crossing the origin. [...] Once
the model is in this submanifold, SGD cannot leave it." (Definition 3 / Corollary 1.)

SGD needs a per-sample loss with the same symmetry for every sample (the theorem is per sample):

* rescaling: l = (w u - y)^2 with y = 1 + sigma * N(0, 1), E[l] = L + sigma^2; w u is computed
  as ``symfast.dcs(w, u)`` and differentiated by autograd;
* rotation: l = -a |theta|^2 + |theta|^4 with a = 1 + sigma * N(0, 1), E[l] = L.

Trajectories start exactly on a stationary condition (they must stay on it, to rounding), and off
it (they go wherever the landscape takes them). Two controls break the symmetry, so the same check
must fail there (a check that cannot fail proves nothing):

* rescaling with a bias, l = (w (u + b) - y)^2 (paper footnote 9): the mirrors move to
  u + b = +-w, so starts on u = w leave it (and starts on the shifted line u + b = w stay);
* an anisotropic quartic, l = -a |theta|^2 - c w^2 + |theta|^4: only the two axes are left as
  mirrors, so starts on any other line through the origin rotate off it.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Optional

import torch
from tqdm import tqdm

import symfast

from .common import apply_overrides, run_experiment, Criterion, new_figure, save_figure, verdict_color

EXPERIMENT = "fig4"
TITLE = "Figure 4 / App. A.1: stationary conditions of (wu-1)^2 and -|theta|^2+|theta|^4, with SGD trajectories"
CLAIM = (
    "Figure 4: 'L = (wu - 1)^2. Here, u = w and u = -w are the stationary conditions caused by the rescaling "
    "symmetry. [...] L = -|theta|^2 + |theta|^4. Here, the stationary condition caused by the rotation symmetry "
    "is every straight line crossing the origin. [...] Once the model is in this submanifold, SGD cannot leave it.'"
)
CLAIM_SHORT = "SGD started on u=+-w ((wu-1)^2) or on any line through 0 (-|t|^2+|t|^4) never leaves it"

STAY_TOL = 1e-12  # float64 rounding over thousands of steps stays far below this
LEAVE_MIN = 1e-2

CRITERIA = [
    Criterion("rescaling.max_dev_on_conditions", "<=", STAY_TOL,
              "(wu-1)^2: SGD started on u = w or u = -w stays on it (max |u -+ w| over all steps)"),
    Criterion("rotation.max_angle_change", "<=", STAY_TOL,
              "-|t|^2+|t|^4: SGD started on any line through 0 stays on it (max |sin angle change|)"),
    Criterion("rescaling_control.min_dev_from_u_eq_w", ">=", LEAVE_MIN,
              "control, bias b breaks the mirror u = w: the same starts leave u = w"),
    Criterion("rotation_control.min_angle_change_off_axes", ">=", LEAVE_MIN,
              "control, anisotropy breaks the rotation: starts off the axes rotate away"),
    Criterion("rotation_control.max_angle_change_on_axes", "<=", STAY_TOL,
              "control: the two axes (mirrors that remain) still hold"),
]


def make_config(quick: bool = True, seed: int = 0, **overrides) -> dict:
    cfg = {
        "quick": quick,
        "seed": seed,
        "steps": 1500 if quick else 10_000,
        "lr": 0.01,
        "sigma": 0.5,
        "bias_b": 0.3,
        "anisotropy_c": 0.25,
        "random_starts": 6 if quick else 24,
        "dtype": "float64",
        "rescaling_on_condition_starts": [[0.15, 0.15], [1.8, 1.8], [-0.6, -0.6], [1.5, -1.5], [-0.9, 0.9]],
        "rotation_angles_deg": [10, 35, 60, 100, 135, 160, 200, 250, 300, 340],
        "rotation_radii": [0.15, 1.1],
        "sgd": "plain SGD, one sample per step, each trajectory with its own sample stream",
    }
    apply_overrides(cfg, overrides)
    return cfg


# ------------------------------------------------------------- the landscapes
def rescaling_loss(w, u, y, b: float = 0.0):
    """Per-sample (w (u + b) - y)^2, summed over independent trajectories; w u through symfast.dcs."""
    return ((symfast.dcs(w, u + b) - y) ** 2).sum()


def rotation_loss(w, u, a, c: float = 0.0):
    r2 = w * w + u * u
    return (-a * r2 - c * w * w + r2 * r2).sum()


def sgd(loss_fn, w0: torch.Tensor, u0: torch.Tensor, noise_fn, steps: int, lr: float, g: torch.Generator,
        desc: str, progress: bool) -> torch.Tensor:
    """SGD on (w, u) for K trajectories at once; returns the path (steps + 1, K, 2)."""
    w, u = w0.clone(), u0.clone()
    path = torch.empty(steps + 1, w.numel(), 2, dtype=w.dtype)
    path[0, :, 0], path[0, :, 1] = w, u
    for t in tqdm(range(steps), desc=desc, disable=not progress, leave=False):
        wg, ug = w.requires_grad_(), u.requires_grad_()
        gw, gu = torch.autograd.grad(loss_fn(wg, ug, noise_fn(g, w.numel())), (wg, ug))
        with torch.no_grad():
            w = (w - lr * gw).detach()
            u = (u - lr * gu).detach()
        path[t + 1, :, 0], path[t + 1, :, 1] = w, u
    return path


def _angle_change(path: torch.Tensor) -> torch.Tensor:
    """max over steps of |sin(angle between theta_t and theta_0)| per trajectory (a line through 0, either side)."""
    p0 = path[0]
    cross = path[..., 0] * p0[:, 1] - path[..., 1] * p0[:, 0]
    norm = path.norm(dim=-1) * p0.norm(dim=-1)
    return (cross.abs() / norm.clamp_min(1e-300)).amax(0)


# ------------------------------------------------------------------------ run
def compute(cfg: dict, progress: bool) -> tuple[dict, dict]:
    g = torch.Generator().manual_seed(int(cfg["seed"]))
    dt = torch.float64
    steps, lr, sig = cfg["steps"], cfg["lr"], cfg["sigma"]

    def y_noise(gen, k):
        return 1.0 + sig * torch.randn(k, generator=gen, dtype=dt)

    paths = {}
    # Rescaling landscape: starts on the two conditions, then random starts off them.
    on = torch.tensor(cfg["rescaling_on_condition_starts"], dtype=dt)
    R = cfg["random_starts"]
    rnd = (torch.rand(R, 2, generator=g, dtype=dt) * 3.6 - 1.8)
    starts = torch.cat([on, rnd])
    p = sgd(lambda w, u, y: rescaling_loss(w, u, y), starts[:, 0], starts[:, 1], y_noise, steps, lr, g,
            "fig4 rescaling", progress)
    paths["rescaling"] = (p, len(on))
    k_on = len(on)
    diag = on[:, 0] == on[:, 1]
    dev_eq = (p[:, :k_on, 1] - p[:, :k_on, 0]).abs().amax(0)  # distance from u = w
    dev_neg = (p[:, :k_on, 1] + p[:, :k_on, 0]).abs().amax(0)  # distance from u = -w
    dev = torch.where(diag, dev_eq, dev_neg)
    final = p[-1]
    rescaling = {
        "on_condition_starts": on.tolist(),
        "max_dev_on_conditions": float(dev.max()),
        "dev_per_start": dev.tolist(),
        "final_on_u_eq_minus_w_norm": [float(final[i].norm()) for i in range(k_on) if not bool(diag[i])],
        "final_mean_wu_random_starts": float((final[k_on:, 0] * final[k_on:, 1]).mean()),
        "final_dist_to_conditions_random_starts": [
            float(min(abs(final[i, 0] - final[i, 1]), abs(final[i, 0] + final[i, 1])) / 2**0.5)
            for i in range(k_on, k_on + R)
        ],
    }

    # Rescaling with a bias (control): same on-condition starts for u = w, plus starts on the shifted line.
    b = cfg["bias_b"]
    on_eq = on[diag]
    shifted = torch.stack([on_eq[:, 0], on_eq[:, 0] - b], 1)  # u + b = w
    starts_c = torch.cat([on_eq, shifted])
    pc = sgd(lambda w, u, y: rescaling_loss(w, u, y, b), starts_c[:, 0], starts_c[:, 1], y_noise, steps, lr, g,
             "fig4 rescaling+bias", progress)
    ke = len(on_eq)
    paths["rescaling_control"] = (pc, ke)
    rescaling_control = {
        "bias_b": b,
        "min_dev_from_u_eq_w": float((pc[:, :ke, 1] - pc[:, :ke, 0]).abs().amax(0).min()),
        "max_dev_from_shifted_line": float((pc[:, ke:, 1] + b - pc[:, ke:, 0]).abs().amax(0).max()),
    }

    # Rotation landscape: starts on lines through the origin at several angles and radii.
    ang = torch.tensor(cfg["rotation_angles_deg"], dtype=dt) * math.pi / 180
    radii = torch.tensor(cfg["rotation_radii"], dtype=dt)
    A, Rr = torch.meshgrid(ang, radii, indexing="ij")
    starts_r = torch.stack([Rr.flatten() * A.flatten().cos(), Rr.flatten() * A.flatten().sin()], 1)

    def a_noise(gen, k):
        return 1.0 + sig * torch.randn(k, generator=gen, dtype=dt)

    pr = sgd(lambda w, u, a: rotation_loss(w, u, a), starts_r[:, 0], starts_r[:, 1], a_noise, steps, lr, g,
             "fig4 rotation", progress)
    paths["rotation"] = (pr, len(starts_r))
    ch = _angle_change(pr)
    rotation = {
        "max_angle_change": float(ch.max()),
        "final_radius_mean": float(pr[-1].norm(dim=-1).mean()),
        "ring_radius_theory": 2**-0.5,
    }

    # Anisotropic control: starts on the axes (remaining mirrors) and off them.
    c = cfg["anisotropy_c"]
    axes_starts = torch.tensor([[0.2, 0.0], [0.0, 0.9], [-1.1, 0.0], [0.0, -0.3]], dtype=dt)
    off = starts_r[(A.flatten() % (math.pi / 2)).sub(math.pi / 4).abs() < math.pi / 4 - 0.05]
    starts_a = torch.cat([axes_starts, off])
    pa = sgd(lambda w, u, a: rotation_loss(w, u, a, c), starts_a[:, 0], starts_a[:, 1], a_noise, steps, lr, g,
             "fig4 rotation+anisotropy", progress)
    na = len(axes_starts)
    paths["rotation_control"] = (pa, na)
    cha = _angle_change(pa)
    rotation_control = {
        "anisotropy_c": c,
        "max_angle_change_on_axes": float(cha[:na].max()),
        "min_angle_change_off_axes": float(cha[na:].min()),
    }
    metrics = {
        "rescaling": rescaling,
        "rescaling_control": rescaling_control,
        "rotation": rotation,
        "rotation_control": rotation_control,
    }
    return metrics, paths


def _plot(rec: dict, paths: dict, out_dir: Path) -> str:
    import numpy as np

    cfg, m = rec["config"], rec["metrics"]
    b, c = cfg["bias_b"], cfg["anisotropy_c"]
    fig = new_figure((12.5, 11.5))
    axes = fig.subplots(2, 2)

    def contour(ax, f, lim, levels):
        g1 = np.linspace(-lim, lim, 301)
        W, U = np.meshgrid(g1, g1)
        Z = f(W, U)
        cs = ax.contourf(W, U, Z, levels=levels, cmap="Greys_r", alpha=0.55, extend="both")
        ax.contour(W, U, Z, levels=levels, colors="0.5", linewidths=0.4)
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")
        ax.set_xlabel("$w$")
        ax.set_ylabel("$u$")
        return cs

    def draw(ax, path, n_on, on_label, off_label, on_color="tab:red", off_color="tab:blue"):
        p = path.numpy()
        for k in range(p.shape[1]):
            is_on = k < n_on
            col = on_color if is_on else off_color
            ax.plot(p[:, k, 0], p[:, k, 1], color=col, lw=1.3 if is_on else 0.9, alpha=0.95 if is_on else 0.75,
                    label=(on_label if k == 0 else None) if is_on else (off_label if k == n_on else None))
            ax.plot(p[0, k, 0], p[0, k, 1], "o", color=col, ms=5, mec="k", mew=0.5)
            ax.plot(p[-1, k, 0], p[-1, k, 1], "*", color=col, ms=11, mec="k", mew=0.5)

    lim1 = 2.0
    xs = np.linspace(-lim1, lim1, 2)

    # (0, 0) rescaling.
    ax = axes[0, 0]
    contour(ax, lambda W, U: np.log10((W * U - 1) ** 2 + 1e-3), lim1, np.linspace(-3, 1.6, 16))
    ax.plot(xs, xs, "--", color="tab:green", lw=2, label="stationary conditions $u = \\pm w$")
    ax.plot(xs, -xs, "--", color="tab:green", lw=2)
    p, n_on = paths["rescaling"]
    draw(ax, p, n_on, "SGD started on $u=\\pm w$", "SGD from random starts")
    r = m["rescaling"]
    ax.set_title(f"$L=(wu-1)^2$ (rescaling symmetry)\nmax $|u\\mp w|$ along on-condition paths: "
                 f"{r['max_dev_on_conditions']:.1e}", fontsize=10)
    ax.legend(fontsize=8, loc="lower left", framealpha=0.9)

    # (0, 1) rotation.
    ax = axes[0, 1]
    lim2 = 1.3
    contour(ax, lambda W, U: -(W**2 + U**2) + (W**2 + U**2) ** 2, lim2, np.linspace(-0.25, 1.2, 16))
    p, n = paths["rotation"]
    ang = np.arctan2(p[0, :, 1].numpy(), p[0, :, 0].numpy())
    for k, a in enumerate(ang):
        ax.plot([-2 * np.cos(a), 2 * np.cos(a)], [-2 * np.sin(a), 2 * np.sin(a)], "--", color="tab:green", lw=0.9,
                alpha=0.7, label="stationary conditions: lines through 0" if k == 0 else None)
    draw(ax, p, n, "SGD started on a line through 0", None)
    ax.add_patch(__import__("matplotlib.patches", fromlist=["Circle"]).Circle(
        (0, 0), 2**-0.5, fill=False, ls=":", color="k", lw=1, label="minima $|\\theta|=1/\\sqrt{2}$"))
    ax.set_title(f"$L=-|\\theta|^2+|\\theta|^4$ (rotation symmetry)\nmax |sin(angle change)| along paths: "
                 f"{m['rotation']['max_angle_change']:.1e}", fontsize=10)
    ax.legend(fontsize=8, loc="lower left", framealpha=0.9)

    # (1, 0) rescaling with bias (control).
    ax = axes[1, 0]
    contour(ax, lambda W, U: np.log10((W * (U + b) - 1) ** 2 + 1e-3), lim1, np.linspace(-3, 1.6, 16))
    ax.plot(xs, xs, ":", color="0.2", lw=1.5, label="$u = w$ (no longer a condition)")
    ax.plot(xs, xs - b, "--", color="tab:green", lw=2, label=f"conditions $u + {b:g} = \\pm w$")
    ax.plot(xs, -xs - b, "--", color="tab:green", lw=2)
    p, n_on = paths["rescaling_control"]
    draw(ax, p, n_on, "SGD started on $u = w$: leaves it", "started on $u + b = w$: stays",
         on_color="tab:orange", off_color="tab:red")
    rc = m["rescaling_control"]
    ax.set_title(f"control: $L=(w(u+{b:g})-1)^2$, the mirror moves (footnote 9)\n"
                 f"min over paths of max $|u-w|$: {rc['min_dev_from_u_eq_w']:.2f}; "
                 f"on the shifted line: {rc['max_dev_from_shifted_line']:.1e}", fontsize=10)
    ax.legend(fontsize=8, loc="lower left", framealpha=0.9)

    # (1, 1) anisotropic quartic (control).
    ax = axes[1, 1]
    contour(ax, lambda W, U: -(W**2 + U**2) - c * W**2 + (W**2 + U**2) ** 2, lim2, np.linspace(-0.4, 1.2, 16))
    ax.axhline(0, color="tab:green", ls="--", lw=2, label="remaining conditions: the axes")
    ax.axvline(0, color="tab:green", ls="--", lw=2)
    p, n_on = paths["rotation_control"]
    draw(ax, p, n_on, "SGD started on an axis: stays", "started off the axes: rotates",
         on_color="tab:red", off_color="tab:orange")
    rr = m["rotation_control"]
    ax.set_title(f"control: $L=-|\\theta|^2-{c:g}w^2+|\\theta|^4$ (rotation broken)\n"
                 f"min angle change off the axes: {rr['min_angle_change_off_axes']:.2f}; "
                 f"on the axes: {rr['max_angle_change_on_axes']:.1e}", fontsize=10)
    ax.legend(fontsize=8, loc="lower left", framealpha=0.9)

    fig.suptitle(
        f"Fig. 4: once SGD is on a stationary condition (green dashed) it cannot leave: {rec['verdict']}\n"
        f"SGD: o start, * end, {cfg['steps']:,} steps, lr {cfg['lr']:g}, one noisy sample per step "
        f"(noise {cfg['sigma']:g}); gray: loss, darker = lower.\nTop: the paper's landscapes. "
        "Bottom: controls with the symmetry broken, where the same check must fail",
        fontsize=11, color=verdict_color(rec["verdict"]),
    )
    return save_figure(fig, out_dir, "fig4.png")


def _headline(metrics: dict, cfg: dict) -> str:
    m = metrics
    headline = (
        f"on-condition drift: rescaling {m['rescaling']['max_dev_on_conditions']:.1e}, rotation "
        f"{m['rotation']['max_angle_change']:.1e}; broken-symmetry controls leave by "
        f">= {m['rescaling_control']['min_dev_from_u_eq_w']:.2f} / "
        f"{m['rotation_control']['min_angle_change_off_axes']:.2f}"
    )
    return headline


NOTES = [
    "SGD noise: one random label (rescaling) or one random coefficient a (rotation) per step; the "
    "per-sample losses keep the symmetry for every sample, as Theorem 4 requires.",
    "Trajectories on u = -w go to the origin, a saddle of L (SGD converges to the symmetric saddle "
    "and stays).",
]


def run(out_dir: str | Path, *, quick: bool = True, seed: int = 0, progress: bool = True,
        config: Optional[dict] = None) -> dict:
    """Run the SGD trajectories; writes fig4.png, result.json and report.md into ``out_dir``."""
    return run_experiment(sys.modules[__name__], out_dir, quick=quick, seed=seed, progress=progress,
                          config=config, headline=_headline, notes=NOTES)
