"""Theorem 4 (the master theorem of O-mirror symmetry), parts 1-4, on random losses built to have a mirror.

Paper (Sec. 3): let l_0(w) satisfy the O-mirror symmetry l_0(w) = l_0((I - 2 O O^T) w). Then
(1) for any gamma, O^T w = 0 implies O^T grad l_gamma = 0; (2) if O^T w = 0, the Hessian's eigenvectors
split into ker(O^T) and im(O O^T); (3) if O^T w != 0 there is gamma_0 such that for all gamma > gamma_0,
l_gamma((I - O O^T) w) < l_gamma(w); (4) there is gamma_1 such that for gamma > gamma_1 all minima of
l_gamma satisfy O^T w = 0. Here l_gamma = l_0 + gamma |w|^2 (eq. 1).

The random losses (D parameters, a random O with k orthonormal columns, N samples; a = (I - O O^T) w,
c = O^T w):

    l_0(w, x_i) = 1/2 (v_i . tanh(A a) + c^T S_i c + tanh(b_i . a) |c|^2 - y_i)^2 + kappa/4 |c|^4

with random A, v_i, S_i (symmetric), b_i, y_i: smooth, a function of (a, c c^T), so it has the O-mirror
and nothing else built in. A control adds an odd term eps * (e_i . c) that breaks the mirror: every
check below must fail on it (the checks can fail).

What is measured (float64):

* part 1: per-sample |O^T grad l_gamma| / |grad l_gamma| at random symmetric points (``stationary_report``),
  against the control points (off the mirror, and the mirror-broken loss);
* part 2: per-sample |m^T H n| / |H n| for m in ker O^T, n in im O (``stationary_report`` with
  per-sample Hessians), and the residuals of the eigenvectors of O^T H O as eigenvectors of H;
* part 3 (literal): at random points off the mirror, gamma_0 from ``symfast.collapse.weight_decay_threshold``;
  l_gamma(symmetric solution) < l_gamma(w) at gamma = 1.02 gamma_0 and > at 0.98 gamma_0;
* part 3 (local, Sec. 4.3, with GD): for a grid of gamma, GD inside the mirror finds a symmetric minimum
  w_0(gamma) (part 1 keeps it there); the critical weight decay gamma* = -xi*/2 at w_0 from the
  per-sample blocks O^T H O (``per_sample_hvp`` onto O, ``critical_weight_decay``) predicts whether GD
  started 1e-6 off the mirror returns (gamma > gamma*) or leaves; GD decides;
* part 4: GD to convergence from many random starts for each gamma of the grid: above an observed
  gamma_1 every minimum found has O^T w = 0; below it some do not.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Optional

import torch
from tqdm import tqdm

import symfast
from symfast.collapse import critical_weight_decay, weight_decay_threshold
from symfast.symmetry import Mirror, stationary_report, verify

from .common import apply_overrides, Criterion, new_figure, save_figure, verdict_color, run_experiment

EXPERIMENT = "theorem4"
TITLE = "Theorem 4, parts 1-4, on random losses with a given O-mirror"
CLAIM = (
    "Theorem 4: let l_0(w) satisfy the O-mirror symmetry. Then (1) for any gamma, if O^T w = 0 then "
    "O^T grad l_gamma = 0; (2) if O^T w = 0, a subset of the eigenvectors of the Hessian spans ker(O^T) and the "
    "rest spans im(O O^T); (3) if O^T w != 0 there is gamma_0 such that for all gamma > gamma_0, "
    "l_gamma((I - O O^T) w) < l_gamma(w); (4) there is gamma_1 such that for all gamma > gamma_1 all minima of "
    "l_gamma satisfy O^T w = 0."
)
CLAIM_SHORT = "O-mirror => O^T grad = 0 and block Hessian on the mirror; weight decay above a threshold favors it"

TOL = 1e-12

CRITERIA = [
    Criterion("part1.max_rel_grad_condition", "<=", TOL,
              "part 1: per-sample |O^T grad l_gamma| / |grad l_gamma| vanishes at every symmetric point, every sample"),
    Criterion("part1.control_min_rel_grad_condition", ">=", 1e-3,
              "part 1 control: off the mirror, and with the mirror broken, the same ratio (largest over samples) is "
              "not small at any point"),
    Criterion("part2.max_rel_block", "<=", TOL,
              "part 2: per-sample |m^T H n| / |H n| vanishes (m in ker O^T, n in im O), every sample"),
    Criterion("part2.max_eigen_residual", "<=", 1e-10,
              "part 2: eigenvectors of O^T H O are eigenvectors of H (|H v - lambda v|)"),
    Criterion("part2.control_min_rel_block", ">=", 1e-3,
              "part 2 control: with the mirror broken the block is not zero"),
    Criterion("part3.fraction_correct", "==", 1.0,
              "part 3: l_gamma(symmetric) < l_gamma(w) just above gamma_0 and > just below it, at every point"),
    Criterion("part3.points_with_positive_gamma0", ">=", 1,
              "part 3 is not vacuous: some points need gamma_0 > 0"),
    Criterion("part3_gd.agreement", "==", 1.0,
              "part 3 with GD: started 1e-6 off the mirror, GD returns iff gamma > gamma* = -xi*/2, on the grid"),
    Criterion("part4.max_condition_above_gamma1", "<=", 1e-6,
              "part 4: at every gamma above the observed gamma_1 all GD minima satisfy O^T w = 0"),
    Criterion("part4.gamma1_observed_finite", "==", True,
              "part 4: such a gamma_1 is found on the grid, and below it some minima are off the mirror"),
]


def make_config(quick: bool = True, seed: int = 0, **overrides) -> dict:
    cfg = {
        "quick": quick,
        "seed": seed,
        "D": 10 if quick else 24,
        "k": 3 if quick else 6,
        "hidden": 6 if quick else 12,
        "n_samples": 24 if quick else 64,
        "S_scale": 1.5,
        "kappa": 0.05,
        "break_eps": 0.1,
        "gamma_eval": 0.05,  # the gamma of l_gamma in parts 1-2
        "points": 6 if quick else 20,
        "gammas": [0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0] if quick
        else [0.0, 0.025, 0.05, 0.075, 0.1, 0.125, 0.15, 0.175, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5, 0.6, 0.7, 0.8, 1.0, 1.2],
        "lr": 0.05,
        "inner_steps": 3000 if quick else 10_000,
        "perturb": 1e-6,
        "perturb_steps": 800 if quick else 2000,
        "near_band": 0.02,  # |gamma - gamma*| below this: too close to call in a finite GD run (not counted)
        "starts": 12 if quick else 48,
        "start_scale": 0.8,
        "min_steps": 6000 if quick else 20_000,
        "off_tol": 1e-6,
        "dtype": "float64",
    }
    apply_overrides(cfg, overrides)
    return cfg


# ----------------------------------------------------------------- the losses
def make_problem(cfg: dict, g: torch.Generator) -> dict:
    D, k, m, N = cfg["D"], cfg["k"], cfg["hidden"], cfg["n_samples"]
    dt = torch.float64
    O, _ = torch.linalg.qr(torch.randn(D, k, generator=g, dtype=dt))
    S = torch.randn(N, k, k, generator=g, dtype=dt) * cfg["S_scale"] / math.sqrt(k)
    return {
        "O": O,
        "A": torch.randn(m, D, generator=g, dtype=dt) / math.sqrt(D),
        "batch": (
            torch.randn(N, m, generator=g, dtype=dt),  # v_i
            0.5 * (S + S.transpose(1, 2)),  # S_i
            torch.randn(N, D, generator=g, dtype=dt) / math.sqrt(D),  # b_i
            torch.randn(N, generator=g, dtype=dt),  # y_i
            torch.randn(N, k, generator=g, dtype=dt),  # e_i (mirror-breaking control only)
        ),
        "kappa": cfg["kappa"],
    }


def losses(theta: torch.Tensor, prob: dict, batch, gamma: float = 0.0, eps: float = 0.0) -> torch.Tensor:
    """Per-sample l_gamma for theta [..., D] and a batch of B samples: [..., B]."""
    v, S, b, y, e = batch
    O, A = prob["O"], prob["A"]
    c = theta @ O  # [..., k]
    a = theta - c @ O.T
    c2 = (c * c).sum(-1, keepdim=True)  # [..., 1]
    f = torch.tanh(a @ A.T) @ v.T  # [..., B]
    f = f + torch.einsum("...k,bkl,...l->...b", c, S, c) + torch.tanh(a @ b.T) * c2
    if eps:
        f = f + eps * (c @ e.T)
    out = 0.5 * (f - y) ** 2 + 0.25 * prob["kappa"] * c2 * c2
    return out + gamma * (theta * theta).sum(-1, keepdim=True)


def loss_fn_of(prob: dict, gamma: float = 0.0, eps: float = 0.0):
    def loss_fn(params, batch):
        return losses(params["theta"], prob, batch, gamma, eps)
    return loss_fn


# ---------------------------------------------------------------------- parts
def _stationary(prob, theta, gamma, eps, cfg):
    mirror = Mirror(prob["O"], params={"theta": theta}, description="random O")
    rep = stationary_report(loss_fn_of(prob, gamma, eps), {"theta": theta}, mirror, prob["batch"],
                            n_pairs=4, per_sample_hessian=True, seed=int(cfg["seed"]))
    rel_grad = (rep.grad_condition / rep.grad_norm.clamp_min(1e-300)).max().item()
    scale = rep.hessian_scale.max().item()
    rel_block = rep.per_sample_hessian_block.abs().max().item() / max(scale, 1e-300)
    resid = rep.eigen_residual.max().item() if rep.eigen_residual is not None else math.nan
    return rel_grad, rel_block, resid, rep.verification


def _control_rel_grad(prob, theta, gamma, eps):
    """max over samples of |O^T grad l_i| / |grad l_i| (a single sample can be small by chance)."""
    def one(t, *sample):
        return losses(t, prob, tuple(s.unsqueeze(0) for s in sample), gamma, eps)[0]
    grads = torch.func.vmap(torch.func.grad(one), in_dims=(None, 0, 0, 0, 0, 0))(theta, *prob["batch"])
    return ((grads @ prob["O"]).norm(dim=1) / grads.norm(dim=1)).max().item()


def part12(prob, cfg, g) -> tuple[dict, dict]:
    D, gam = cfg["D"], cfg["gamma_eval"]
    O = prob["O"]
    P_perp = torch.eye(D, dtype=O.dtype) - O @ O.T
    rel_g, rel_b, res, ver_dev, ctrl_g, ctrl_b, verified = [], [], [], [], [], [], []
    for _ in range(int(cfg["points"])):
        raw = torch.randn(D, generator=g, dtype=O.dtype)
        sym = P_perp @ raw
        a, b, r, ver = _stationary(prob, sym, gam, 0.0, cfg)
        rel_g.append(a), rel_b.append(b), res.append(r)
        # verify: l(theta) = l(R theta) at a point off the mirror (non-vacuous)
        v = verify(loss_fn_of(prob), {"theta": raw}, Mirror(prob["O"], params={"theta": raw}), [prob["batch"]])
        ver_dev.append(v.relative_deviation)
        verified.append(bool(v))  # passed and not vacuous
        # controls: off the mirror (same loss) and on the mirror with the mirror broken
        ctrl_g.append(_control_rel_grad(prob, raw, gam, 0.0))
        _, b2, _, _ = _stationary(prob, sym, gam, cfg["break_eps"], cfg)
        ctrl_g.append(_control_rel_grad(prob, sym, gam, cfg["break_eps"]))
        ctrl_b.append(b2)
    # one sample's Hessian at a symmetric point, in the basis (ker O^T, O), for the figure
    evals, evecs = torch.linalg.eigh(P_perp)
    basis = torch.cat([evecs[:, evals > 0.5], O], dim=1)
    sym = P_perp @ torch.randn(D, generator=g, dtype=O.dtype)
    one = lambda t: losses(t, prob, tuple(s[:1] for s in prob["batch"]), gam)[0]  # noqa: E731
    one_b = lambda t: losses(t, prob, tuple(s[:1] for s in prob["batch"]), gam, cfg["break_eps"])[0]  # noqa: E731
    H = basis.T @ torch.func.hessian(one)(sym) @ basis
    Hb = basis.T @ torch.func.hessian(one_b)(sym) @ basis
    p1 = {"max_rel_grad_condition": max(rel_g), "control_min_rel_grad_condition": min(ctrl_g),
          "points": len(rel_g), "samples": cfg["n_samples"], "gamma": gam,
          "mirror_verified_every_point": all(verified), "max_verify_rel_deviation": max(ver_dev)}
    p2 = {"max_rel_block": max(rel_b), "max_eigen_residual": max(res), "control_min_rel_block": min(ctrl_b)}
    return {"part1": p1, "part2": p2}, {"H": H, "Hb": Hb, "k": cfg["k"]}


def part3_literal(prob, cfg, g, extra_points=None) -> dict:
    D = cfg["D"]
    O = prob["O"]
    loss_fn = loss_fn_of(prob)
    dirs = {"theta": O.T.contiguous()}
    ok, positive, gammas0 = 0, 0, []
    pts = [torch.randn(D, generator=g, dtype=O.dtype) * cfg["start_scale"] for _ in range(int(cfg["points"]) * 2)]
    n_random = len(pts)
    if extra_points is not None:
        pts += list(extra_points[: int(cfg["points"]) * 2])
    n = len(pts)
    for th in pts:
        g0 = weight_decay_threshold(loss_fn, {"theta": th}, dirs, prob["batch"]).item()
        gammas0.append(g0)
        sym = th - O @ (O.T @ th)

        def L(t, gam):
            return losses(t, prob, prob["batch"], gam).mean().item()

        above = L(sym, g0 * 1.02 + 1e-9) < L(th, g0 * 1.02 + 1e-9)
        below = True if g0 == 0 else L(sym, g0 * 0.98) > L(th, g0 * 0.98)
        positive += g0 > 0
        ok += above and below
    return {"fraction_correct": ok / n, "points": n, "random_points": n_random,
            "gd_minima_off_mirror_points": n - n_random, "points_with_positive_gamma0": positive,
            "gamma0_values": gammas0}


def _gd(theta, prob, gammas, lr, steps, project: bool = False, history: Optional[list] = None):
    """Plain GD on the batch-mean l_gamma for theta [G, D] with gammas [G] (gradients by autograd).

    ``project``: remove the O-component after every step. Part 1 makes it exactly zero in exact arithmetic;
    where the mirror is unstable, rounding (1e-16) would otherwise grow exponentially over thousands of steps.
    Returns (theta, largest |O^T grad| met on the way when projecting)."""
    O = prob["O"]
    gcol = gammas.view(-1)
    worst = 0.0
    for _ in range(steps):
        t = theta.detach().requires_grad_(True)
        L = losses(t, prob, prob["batch"]).mean(-1) + gcol * (t * t).sum(-1)
        (grad,) = torch.autograd.grad(L.sum(), t)
        theta = (t - lr * grad).detach()
        if history is not None:
            history.append((theta @ O).norm(dim=1))
        if project:
            worst = max(worst, (grad @ O).norm(dim=1).max().item())
            theta = theta - (theta @ O) @ O.T
    return theta, worst


def part3_gd_and_4(prob, cfg, g, progress) -> tuple[dict, dict, dict]:
    D, k = cfg["D"], cfg["k"]
    O = prob["O"]
    gam = torch.tensor(cfg["gammas"], dtype=torch.float64)
    G = gam.numel()
    P_perp = torch.eye(D, dtype=O.dtype) - O @ O.T
    # symmetric minima w_0(gamma), found inside the mirror (part 1 keeps GD there)
    start = (P_perp @ torch.randn(D, generator=g, dtype=O.dtype)).expand(G, D).clone()
    w0, drift = _gd(start, prob, gam, cfg["lr"], int(cfg["inner_steps"]), project=True)
    # gamma* at each w0 from the per-sample blocks O^T H_0(x_i) O of l_0 (no regularizer)
    loss0 = loss_fn_of(prob)
    gstar, xi = [], []
    for j in range(G):
        p = {"theta": w0[j]}
        # per-sample blocks O^T H_0(x_i) O, one Hessian-vector product per column of O
        blocks = torch.stack([symfast.per_sample_hvp(loss0, p, {"theta": O[:, j].contiguous()}, prob["batch"],
                                                     onto={"theta": O.T.contiguous()}) for j in range(k)], dim=2)
        blocks = 0.5 * (blocks + blocks.transpose(1, 2))
        gstar.append(critical_weight_decay(blocks).item())
        xi.append(torch.linalg.eigvalsh(blocks.mean(0)).min().item())
    gstar_t = torch.tensor(gstar, dtype=torch.float64)
    # GD from 1e-6 off the mirror
    c0 = torch.randn(G, k, generator=g, dtype=O.dtype)
    c0 = cfg["perturb"] * c0 / c0.norm(dim=1, keepdim=True)
    hist: list = []
    _gd(w0 + c0 @ O.T, prob, gam, cfg["lr"], int(cfg["perturb_steps"]), history=hist)
    hist_t = torch.stack(hist)  # [T, G]
    # the rate up to the step where |O^T w| falls below 1e-12 (below it rounding, not GD, sets the size)
    T_end = torch.tensor([int(((hist_t[:, j] < 1e-12).nonzero()[0, 0]) if (hist_t[:, j] < 1e-12).any()
                              else hist_t.shape[0] - 1) for j in range(G)])
    rate = torch.log(hist_t[T_end, torch.arange(G)] / cfg["perturb"]) / (T_end + 1).double()
    returns = rate < 0
    predicted = gam > gstar_t
    decided = (gam - gstar_t).abs() > cfg["near_band"]
    agree = (returns == predicted)[decided]
    p3 = {"gammas": gam.tolist(), "gamma_star": gstar, "xi_star": xi, "observed_log_rate_per_step": rate.tolist(),
          "gd_returns": returns.tolist(), "predicted_attractive": predicted.tolist(), "decided": decided.tolist(),
          "agreement": agree.double().mean().item() if agree.numel() else math.nan,
          "n_decided": int(decided.sum()), "max_abs_grad_condition_inside_mirror_gd": drift,
          "predicted_log_rate_per_step": [math.log(abs(1 - cfg["lr"] * (x + 2 * gg))) for x, gg in zip(xi, gam.tolist())]}
    # part 4: GD from random starts for each gamma
    M = int(cfg["starts"])
    starts = torch.randn(M, D, generator=g, dtype=O.dtype) * cfg["start_scale"]
    th = starts.repeat(G, 1)
    gg = gam.repeat_interleave(M)
    th, _ = _gd(th, prob, gg, cfg["lr"], int(cfg["min_steps"]))
    cond = (th @ O).norm(dim=1).view(G, M)
    off = (cond > cfg["off_tol"]).double().mean(1)
    max_cond = cond.max(1).values
    above_idx = [j for j in range(G) if all(off[i] == 0 for i in range(j, G))]
    g1_idx = above_idx[0] if above_idx else None
    gamma1 = gam[g1_idx].item() if g1_idx is not None else math.nan
    finite = g1_idx is not None and g1_idx > 0
    p4 = {"gammas": gam.tolist(), "fraction_off_mirror": off.tolist(), "max_condition": max_cond.tolist(),
          "gamma1_observed": gamma1, "gamma1_observed_finite": bool(finite),
          "max_condition_above_gamma1": max_cond[g1_idx:].max().item() if g1_idx is not None else math.nan,
          "starts": M}
    p4["_ends_off_mirror"] = th.view(G, M, D)[off.view(G, 1).expand(G, M).bool() & (cond > cfg["off_tol"])]
    return p3, p4, {"gam": gam, "gstar": gstar_t, "rate": rate, "off": off, "pred_rate": p3["predicted_log_rate_per_step"]}


def compute(cfg: dict, progress: bool) -> tuple[dict, dict]:
    g = torch.Generator().manual_seed(int(cfg["seed"]))
    prob = make_problem(cfg, g)
    steps = tqdm(total=3, desc="theorem4", disable=not progress, leave=False)
    m12, pd = part12(prob, cfg, g)
    steps.update()
    p3gd, p4, pd2 = part3_gd_and_4(prob, cfg, g, progress)
    steps.update()
    p3 = part3_literal(prob, cfg, g, p4.pop("_ends_off_mirror"))
    steps.update()
    steps.close()
    pd.update(pd2)
    return {**m12, "part3": p3, "part3_gd": p3gd, "part4": p4}, pd


def _plot(rec: dict, pd: dict, out_dir: Path) -> str:
    import numpy as np

    m = rec["metrics"]
    fig = new_figure((15.5, 4.4))
    axes = fig.subplots(1, 4)
    # (1) the Hessian of one sample in the basis (ker O^T, O): intact mirror vs broken
    ax = axes[0]
    H, Hb, k = pd["H"].numpy(), pd["Hb"].numpy(), pd["k"]
    n = H.shape[0]
    show = np.where(np.tri(n, dtype=bool).T, H, Hb)  # upper: mirror, lower: broken
    lim = abs(show).max()
    im = ax.imshow(show, cmap="RdBu_r", vmin=-lim, vmax=lim)
    ax.axhline(n - k - 0.5, color="k", lw=1)
    ax.axvline(n - k - 0.5, color="k", lw=1)
    fig.colorbar(im, ax=ax, shrink=0.75)
    ax.set_title("part 2: one sample's Hessian in basis (ker O^T | O)\nupper triangle: O-mirror loss "
                 "(off-diagonal block = 0);\nlower triangle: mirror broken", fontsize=8.5)
    ax.set_xticks([]), ax.set_yticks([])
    # (2) parts 1-2 numbers against the controls
    ax = axes[1]
    vals = [m["part1"]["max_rel_grad_condition"], m["part1"]["control_min_rel_grad_condition"],
            m["part2"]["max_rel_block"], m["part2"]["control_min_rel_block"]]
    labels = ["part 1\non mirror\n(max)", "part 1\ncontrol\n(min)", "part 2\non mirror\n(max)",
              "part 2\ncontrol\n(min)"]
    colors = ["tab:green", "tab:red", "tab:green", "tab:red"]
    ax.bar(range(4), [max(v, 1e-18) for v in vals], color=colors)
    ax.set_yscale("log")
    ax.set_ylim(1e-18, 10)
    ax.axhline(1e-12, color="k", ls="--", lw=0.8)
    ax.text(3.4, 2e-12, "criterion 1e-12", fontsize=7, ha="right")
    ax.set_xticks(range(4), labels, fontsize=8)
    ax.set_ylabel("part 1: |O^T grad l|/|grad l|;  part 2: |m^T H n|/|H n|", fontsize=8)
    ax.set_title("parts 1, 2: zero on the mirror for every sample\n"
                 "(controls: off the mirror / mirror broken)", fontsize=9)
    # (3) part 3 with GD: escape rate vs gamma with the predicted threshold
    ax = axes[2]
    gam, rate = pd["gam"].numpy(), pd["rate"].numpy()
    ax.plot(gam, rate, "o", color="k", label="observed log-rate of |O^T w| (GD)")
    ax.plot(gam, pd["pred_rate"], "-", color="tab:blue", lw=1, label=r"predicted $\log|1-\lambda(\xi^*+2\gamma)|$")
    gs = pd["gstar"].numpy()
    ax.axhline(0, color="0.6", lw=0.8)
    cross = m["part3_gd"]["gamma_star"]
    ax.plot(gam, np.zeros_like(gam), alpha=0)
    for j, gsj in enumerate(gs):
        ax.plot([gsj], [0], "|", color="tab:orange", ms=14, mew=2, label=r"$\gamma^*(w_0(\gamma))=-\xi^*/2$" if j == 0 else None)
    ax.set_xlabel(r"weight decay $\gamma$ (eq. 1: $\ell_0 + \gamma|w|^2$)")
    ax.set_ylabel(r"growth per GD step of $|O^T w|$ (<0: returns)")
    ax.set_title(f"part 3 (local, GD): returns iff gamma > gamma*\nagreement {m['part3_gd']['agreement']:.2f} "
                 f"on {m['part3_gd']['n_decided']} gammas; literal part 3: {m['part3']['fraction_correct']:.2f} "
                 f"of {m['part3']['points']} points", fontsize=8.5)
    ax.legend(fontsize=7)
    del cross
    # (4) part 4: fraction of GD minima off the mirror vs gamma
    ax = axes[3]
    ax.plot(gam, pd["off"].numpy(), "o-", color="tab:purple")
    g1 = m["part4"]["gamma1_observed"]
    if math.isfinite(g1):
        ax.axvline(g1, color="k", ls=":", label=f"observed gamma_1 = {g1:g}")
    ax.axvline(float(np.median(gs)), color="tab:orange", ls="--", label=f"median gamma* = {np.median(gs):.3g}")
    ax.set_xlabel(r"weight decay $\gamma$")
    ax.set_ylabel(f"fraction of {m['part4']['starts']} GD runs ending off the mirror", fontsize=9)
    ax.set_ylim(-0.03, 1.03)
    ax.set_title("part 4: above gamma_1 every GD minimum\nsatisfies O^T w = 0 (|O^T w| < 1e-6)", fontsize=9)
    ax.legend(fontsize=7.5)
    fig.suptitle(f"{rec['experiment']}: {rec['verdict']} - Theorem 4 on a random loss with an O-mirror "
                 f"(D = {rec['config']['D']}, k = {rec['config']['k']})", color=verdict_color(rec["verdict"]),
                 fontsize=11)
    return save_figure(fig, out_dir, "theorem4.png")


def _headline(metrics: dict, cfg: dict) -> str:
    m = metrics
    headline = (
        f"part 1 max {m['part1']['max_rel_grad_condition']:.1e} (control {m['part1']['control_min_rel_grad_condition']:.1e}); "
        f"part 2 max {m['part2']['max_rel_block']:.1e} (control {m['part2']['control_min_rel_block']:.1e}); "
        f"part 3 {m['part3']['fraction_correct']:.2f} of {m['part3']['points']} points, GD agreement "
        f"{m['part3_gd']['agreement']:.2f}; part 4 gamma_1 = {m['part4']['gamma1_observed']:g}"
    )
    return headline


NOTES = [
    "Part 3 is checked twice: literally (gamma_0 = (l_0(sym) - l_0(w)) / |O^T w|^2, "
    "symfast.collapse.weight_decay_threshold, against l_gamma evaluated at 0.98 and 1.02 gamma_0), and "
    "locally as Sec. 4.3 uses it (GD is attracted to the symmetric solution iff xi* + 2 gamma > 0). "
    "The local check uses gamma* at the symmetric minimum w_0(gamma) of each gamma; grid points within "
    "near_band of gamma* are not counted (a finite GD run cannot call them).",
    "Part 4 is an existence statement: gamma_1 is read off the grid as the smallest gamma from which "
    "every GD run from random starts ends on the mirror; GD finds minima (or slow saddles) reachable "
    "from those starts, not all minima.",
    "The controls (off the mirror; an added odd term eps e_i . c that breaks the mirror) show the "
    "zero checks can fail.",
    "What is evidence and what is not: the literal part-3 check is an identity of gamma_0's definition "
    "(l_gamma(sym) - l_gamma(w) = l_0(sym) - l_0(w) - gamma |O^T w|^2), and at points where gamma_0 = 0 "
    "(clamped) it passes trivially; it checks the code, not the theorem. Likewise 'every GD minimum above "
    "gamma_1 is on the mirror' holds by how gamma_1 is read off the grid; only that a finite gamma_1 exists "
    "informs. The evidence for part 3 is the local GD check, whose observed escape rates per step track the "
    "predicted ones (part3_gd.observed_log_rate_per_step against predicted_log_rate_per_step).",
]


def run(out_dir: str | Path, *, quick: bool = True, seed: int = 0, progress: bool = True,
        config: Optional[dict] = None) -> dict:
    """Check Theorem 4 parts 1-4; writes theorem4.png, result.json and report.md into ``out_dir``."""
    return run_experiment(sys.modules[__name__], out_dir, quick=quick, seed=seed, progress=progress,
                          config=config, headline=_headline, notes=NOTES)
