"""Figure 3 (Sec. 4.4, App. A.3): loss of plasticity from the rescaling symmetry, and two remedies.

Paper: a linear regressor is trained on 10 tasks in sequence (each task: 100 fresh points,
x ~ N(0, I_100), y = sum(x)/100 + eps; the weights of task j start task j + 1), with "Adam without
momentum" and batch size 16 for 25000 steps. Dead parameters (a vanishing gradient) are counted
after each task. Vanilla regression has no symmetry and no dead parameters; with theta = w * u
(rescaling symmetry) "the number of dead neurons increases steadily"; injecting Gaussian noise of
variance 1e-4 into the gradient, or biasing every weight by a fixed random beta_i ~ N(0, 1e-4),
brings it back to the vanilla level.

Models (all trained on the same minibatches, batched as independent rows):

* ``vanilla``  theta trained directly;
* ``rescaling``  theta = symfast.dcs(w, u) = w * u;
* ``rescaling+noise``  the same, N(0, 1e-4) added to the gradients of w and u at every step;
* ``rescaling+bias``  theta = symfast.dcs(w + beta_w, u + beta_u), beta ~ N(0, 1e-4) fixed
  ("w_i -> w_i + beta_i" for every weight parameter, so for both factors).

Dead parameter: |d L / d p| <= ``dead_tol`` for the gradient of the training objective on 1000 fresh
points (a parameter that cannot respond to new data), counted as a fraction of the model's
parameters (100 for vanilla, 200 for the factorized models).

Two settings the paper does not give decide whether the effect shows, and are recorded: the
learning rate (0.1) and the label noise (std 3). Adam's collapse onto w = u = 0 needs gradient noise
that is large against the per-coordinate signal 1/100 (the same signal-to-noise competition as eq. 9).

Weight decay. App. A.3 mentions none, and that matters for the bias remedy. Without weight decay,
SGD and Adam are translation-equivariant: training theta = (w + beta_w)(u + beta_u) is training
w' * u' from the shifted start w' = w + beta_w. The symmetry is moved to w = -beta_w, u = -beta_u, not
removed, and that point absorbs the dynamics exactly like the origin; by construction the bias cannot
act there. The paper's footnote 9 says the biased symmetric point is "benign" *because weight decay*
pulls away from it. The verdict is therefore judged under footnote 9's condition, weight decay 1e-2
both coupled (torch.optim.Adam) and decoupled (torch.optim.AdamW, whose default it is), and every part
of the claim must hold in both. Weight decay 0 is run and reported as "not testable as stated" for the
bias remedy, with that reason.

A remedy works when it leaves at most ``REMEDY_MAX_RATIO`` (10%) of plain rescaling's dead fraction
(largest over the tasks): a threshold relative to the effect it removes, since how many parameters a
finite run leaves under ``dead_tol`` grows with the steps per task.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import torch
from tqdm import tqdm

import symfast

from .common import (
    apply_overrides,
    Criterion,
    deviation,
    judge,
    new_figure,
    run_experiment,
    save_figure,
    verdict_color,
)

EXPERIMENT = "fig3"
TITLE = "Figure 3 / App. A.3: loss of plasticity over 10 tasks (dead parameters), and its two remedies"
CLAIM = (
    "Figure 3 / Sec. 4.4: 'Vanilla regression has no symmetry and does not suffer plasticity loss, whereas having "
    "symmetries leads to the loss of plasticity. One can fix the problem with one of the two suggested methods, "
    "either by removing the symmetry in the model [a fixed random bias] or removing the absorbing states by "
    "injecting noise [gradient noise of variance 1e-4].'"
)
CLAIM_SHORT = "dead parameters grow over tasks only with theta=w*u; gradient noise or a random bias stops it"

MODELS = ("vanilla", "rescaling", "rescaling+noise", "rescaling+bias")

VANILLA_MAX = 0.01  # vanilla: never more than 1% dead
MIN_GROWTH = 0.10  # rescaling: +10 points of dead parameters from the first to the last task
REMEDY_MAX_RATIO = 0.10  # a remedy: at most 10% of plain rescaling's dead fraction (largest over the tasks)

#: App. A.3's stated settings.
PAPER = {"steps_per_task": 25_000, "batch_size": 16, "tasks": 10, "points_per_task": 100, "d": 100,
         "grad_noise_var": 1e-4, "bias_var": 1e-4}

WD0_NOT_TESTABLE = (
    "not testable as stated: without weight decay Adam is translation-equivariant, so theta = (w + beta_w)(u + "
    "beta_u) is the plain rescaled model from a shifted start; the symmetric point moves to (-beta_w, -beta_u) and "
    "absorbs like the origin, so a fixed bias cannot act by construction (footnote 9: the biased point is benign "
    "because weight decay pulls away from it)"
)


def _criteria(prefix: str) -> list[Criterion]:
    return [
        Criterion(f"{prefix}.vanilla.max_dead_frac", "<=", VANILLA_MAX,
                  "vanilla (no symmetry) has no dead parameters at any task"),
        Criterion(f"{prefix}.rescaling.dead_growth", ">=", MIN_GROWTH,
                  "theta = w*u: the dead fraction grows from the first to the last task"),
        Criterion(f"{prefix}.rescaling+noise.dead_ratio_vs_rescaling", "<=", REMEDY_MAX_RATIO,
                  "gradient noise (var 1e-4): its largest dead fraction over the tasks, relative to plain rescaling's"),
        Criterion(f"{prefix}.rescaling+bias.dead_ratio_vs_rescaling", "<=", REMEDY_MAX_RATIO,
                  "a fixed random bias (var 1e-4): its largest dead fraction over the tasks, relative to plain "
                  "rescaling's"),
    ]


def setting_key(wd: float, mode: str) -> str:
    """Metrics key of a weight-decay setting, without dots (criteria address metrics by dotted paths)."""
    return "wd_0" if wd == 0 else f"{mode}_wd_{wd:.0e}"


def make_config(quick: bool = True, seed: int = 0, **overrides) -> dict:
    cfg = {
        "quick": quick,
        "seed": seed,
        "d": 100,
        "points_per_task": 100,
        "tasks": 10,
        "batch_size": 16,
        "steps_per_task": 2_500 if quick else 25_000,  # App. A.3: 25000
        "replicates": 4 if quick else 8,
        "lr": 0.1,
        "adam_betas": [0.0, 0.999],
        "adam_eps": 1e-8,
        "reset_optimizer_each_task": True,
        "label_noise_std": 3.0,
        "init_scale": 1.0,
        "grad_noise_var": 1e-4,
        "bias_var": 1e-4,
        # footnote 9's condition, coupled (Adam) and decoupled (AdamW, whose default is 1e-2), judged; 0 reported
        "settings": [{"weight_decay": 0.0, "mode": "coupled"}, {"weight_decay": 1e-2, "mode": "coupled"},
                     {"weight_decay": 1e-2, "mode": "decoupled"}],
        "probe_points": 1000,
        "dead_tol": 1e-6,
        "dtype": "float32",
        "data": "per task: x ~ N(0, I_d), y = sum(x)/d + label_noise_std * N(0, 1); 100 points; minibatches of 16 "
        "drawn with replacement",
        "loss": "mean over the minibatch of (theta . x - y)^2",
        "optimizer": "Adam with betas (0, 0.999) ('without momentum'), eps 1e-8, constant lr; weight decay coupled "
        "as torch.optim.Adam's (wd * p added to the gradient) or decoupled as torch.optim.AdamW's (p *= 1 - lr * wd "
        "before the step); state reset at each task",
        "init": "w, u ~ init_scale * N(0, 1); vanilla starts from theta = w * u (same function); same init for all",
        "dead": "|gradient of the training objective on probe_points fresh points| <= dead_tol",
    }
    apply_overrides(cfg, overrides)
    for st in cfg["settings"]:
        if set(st) != {"weight_decay", "mode"} or st["mode"] not in ("coupled", "decoupled") or st["weight_decay"] < 0:
            raise ValueError("settings: each entry must be {'weight_decay': >= 0, 'mode': 'coupled' or 'decoupled'}, "
                             f"got {st!r}")
    if not any(st["weight_decay"] > 0 for st in cfg["settings"]):
        raise ValueError("settings: the verdict needs at least one setting with weight decay > 0 (footnote 9)")
    keys = [setting_key(st["weight_decay"], st["mode"]) for st in cfg["settings"]]
    if len(set(keys)) != len(keys):
        raise ValueError(f"settings: duplicate entries {keys}")
    return cfg


# ------------------------------------------------------------------- the step
def adam_step_(p: torch.Tensor, v: torch.Tensor, grad: torch.Tensor, t: int, lr: float, beta2: float,
               eps: float) -> None:
    """In place: Adam with beta1 = 0 (torch.optim.Adam's update, bias-corrected second moment)."""
    v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    denom = (v / (1 - beta2**t)).sqrt_().add_(eps)
    p.addcdiv_(grad, denom, value=-lr)


def theta_grad(theta: torch.Tensor, X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """d/d theta of mean_b (theta . x_b - y_b)^2 for batched models.

    theta (..., R, d); X (R, B, d); Y (R, B) -> (..., R, d).
    """
    r = (theta.unsqueeze(-2) * X).sum(-1) - Y  # (..., R, B)
    return (2.0 / X.shape[-2]) * (r.unsqueeze(-1) * X).sum(-2)


def factor_grads(w, u, bw, bu, X, Y, wd):
    """Gradients of the factorized models, theta = dcs(w + bw, u + bu), plus weight decay wd * p."""
    a, b = w + bw, u + bu
    gt = theta_grad(symfast.dcs(a, b), X, Y)
    return gt * b + wd * w, gt * a + wd * u


# ------------------------------------------------------------------ training
def train(cfg: dict, progress: bool = True) -> dict:
    d, n, B, R = cfg["d"], cfg["points_per_task"], cfg["batch_size"], cfg["replicates"]
    S = len(cfg["settings"])
    lr, (_, beta2), eps = cfg["lr"], cfg["adam_betas"], cfg["adam_eps"]
    g = torch.Generator().manual_seed(int(cfg["seed"]))
    dt = getattr(torch, cfg["dtype"])

    w0 = torch.randn(R, d, generator=g, dtype=torch.float64) * cfg["init_scale"]
    u0 = torch.randn(R, d, generator=g, dtype=torch.float64) * cfg["init_scale"]
    sb = cfg["bias_var"] ** 0.5
    bias = torch.randn(2, R, d, generator=g, dtype=torch.float64) * sb
    # Factorized models: (S, 3, R, d), rows = rescaling, +noise, +bias.
    W = w0.to(dt).expand(S, 3, R, d).contiguous()
    U = u0.to(dt).expand(S, 3, R, d).contiguous()
    BW = torch.zeros(1, 3, R, d, dtype=dt)
    BU = torch.zeros(1, 3, R, d, dtype=dt)
    BW[0, 2], BU[0, 2] = bias[0].to(dt), bias[1].to(dt)
    noise_std = torch.tensor([0.0, cfg["grad_noise_var"] ** 0.5, 0.0], dtype=dt).view(1, 3, 1, 1)
    TH = (w0 * u0).to(dt).expand(S, R, d).contiguous()  # vanilla: same initial function
    wds = torch.tensor([st["weight_decay"] for st in cfg["settings"]], dtype=dt)
    decoupled = torch.tensor([st["mode"] == "decoupled" for st in cfg["settings"]])
    # coupled (torch.optim.Adam): wd * p joins the gradient; decoupled (torch.optim.AdamW): p *= 1 - lr * wd.
    wd_f = torch.where(decoupled, 0.0, wds).view(S, 1, 1, 1)
    wd_v = wd_f.view(S, 1, 1)
    shrink_f = torch.where(decoupled, 1 - lr * wds, 1.0).view(S, 1, 1, 1)

    dead = {m: [] for m in MODELS}
    exact = {m: [] for m in MODELS}
    probe_loss = {m: [] for m in MODELS}
    T, steps = cfg["tasks"], cfg["steps_per_task"]
    with tqdm(total=T * steps, desc="fig3 tasks", unit="step", disable=not progress, leave=False) as bar:
        for task in range(T):
            X = torch.randn(R, n, d, generator=g, dtype=dt)
            Y = X.sum(-1) / d + cfg["label_noise_std"] * torch.randn(R, n, generator=g, dtype=dt)
            vW, vU, vT = torch.zeros_like(W), torch.zeros_like(U), torch.zeros_like(TH)
            for t in range(1, steps + 1):
                idx = torch.randint(0, n, (B,), generator=g)
                Xb, Yb = X[:, idx], Y[:, idx]
                gT = theta_grad(TH, Xb, Yb) + wd_v * TH
                gW, gU = factor_grads(W, U, BW, BU, Xb, Yb, wd_f)
                gW += noise_std * torch.randn(W.shape, generator=g, dtype=dt)
                gU += noise_std * torch.randn(U.shape, generator=g, dtype=dt)
                TH.mul_(shrink_f.view(S, 1, 1))
                W.mul_(shrink_f)
                U.mul_(shrink_f)
                adam_step_(TH, vT, gT, t, lr, beta2, eps)
                adam_step_(W, vW, gW, t, lr, beta2, eps)
                adam_step_(U, vU, gU, t, lr, beta2, eps)
                if t % 500 == 0:
                    bar.update(500)
            bar.update(steps % 500)
            # Probe: the full training-objective gradient on fresh data.
            Xp = torch.randn(R, cfg["probe_points"], d, generator=g, dtype=dt)
            Yp = Xp.sum(-1) / d + cfg["label_noise_std"] * torch.randn(R, cfg["probe_points"], generator=g, dtype=dt)
            gT = (theta_grad(TH, Xp, Yp) + wd_v * TH).abs()
            gW, gU = factor_grads(W, U, BW, BU, Xp, Yp, wd_f)
            gF = torch.cat([gW.abs(), gU.abs()], -1)  # (S, 3, R, 2d)
            thetas = {"vanilla": TH, "factor": symfast.dcs(W + BW, U + BU)}
            tol = cfg["dead_tol"]
            per = {"vanilla": gT, "rescaling": gF[:, 0], "rescaling+noise": gF[:, 1], "rescaling+bias": gF[:, 2]}
            for m, gm in per.items():
                dead[m].append((gm <= tol).double().mean(-1).mean(-1).tolist())  # (S,) mean over replicates
                exact[m].append((gm == 0).double().mean(-1).mean(-1).tolist())
            lv = ((thetas["vanilla"].unsqueeze(-2) * Xp).sum(-1) - Yp).pow(2).mean(-1).mean(-1)
            lf = ((thetas["factor"].unsqueeze(-2) * Xp).sum(-1) - Yp).pow(2).mean(-1).mean(-1)  # (S, 3)
            probe_loss["vanilla"].append(lv.tolist())
            for j, m in enumerate(MODELS[1:]):
                probe_loss[m].append(lf[:, j].tolist())
    return {"dead": dead, "exact": exact, "probe_loss": probe_loss}


# ------------------------------------------------------------------- metrics
def compute_metrics(out: dict, cfg: dict) -> dict:
    by_setting = {}
    for s, st in enumerate(cfg["settings"]):
        per_model = {}
        for m in MODELS:
            dead = [row[s] for row in out["dead"][m]]
            per_model[m] = {
                "dead_frac_per_task": dead,
                "exact_zero_grad_frac_per_task": [row[s] for row in out["exact"][m]],
                "probe_loss_per_task": [row[s] for row in out["probe_loss"][m]],
                "max_dead_frac": max(dead),
                "first_task_dead_frac": dead[0],
                "last_task_dead_frac": dead[-1],
                "dead_growth": dead[-1] - dead[0],
            }
        ref = per_model["rescaling"]["max_dead_frac"]
        for m in ("rescaling+noise", "rescaling+bias"):
            # None when plain rescaling has no dead parameters: there is nothing to remedy (the check fails).
            per_model[m]["dead_ratio_vs_rescaling"] = per_model[m]["max_dead_frac"] / ref if ref > 0 else None
        by_setting[setting_key(st["weight_decay"], st["mode"])] = dict(per_model, **st)
    judged = [k for k, st in zip(by_setting, cfg["settings"]) if st["weight_decay"] > 0]
    metrics = {
        "noise_floor": {"label_noise_variance": cfg["label_noise_std"] ** 2},
        "dead_definition": f"fraction of parameters with |probe gradient| <= {cfg['dead_tol']:g}",
        **by_setting,
        "judged": judged,
    }
    report = {}
    for key in by_setting:
        v, checks = judge(metrics, _criteria(key))
        report[key] = {"verdict": v, "checks": checks}
        if key not in judged:
            report[key]["verdict"] = "not testable as stated (bias remedy); reported"
            report[key]["reason"] = WD0_NOT_TESTABLE
    metrics["per_setting"] = report
    return metrics


# -------------------------------------------------------------------- figure
STYLE = {
    "vanilla": dict(color="k", ls="--", marker="o", label="vanilla $\\theta$ (no symmetry)"),
    "rescaling": dict(color="tab:red", ls="-", marker="s", label="rescaling $\\theta = w\\odot u$"),
    "rescaling+noise": dict(color="tab:blue", ls="-", marker="^", label="rescaling + gradient noise (var 1e-4)"),
    "rescaling+bias": dict(color="tab:green", ls="-", marker="D", label="rescaling + fixed random bias (var 1e-4)"),
}


def _plot(rec: dict, plot_data: None, out_dir: Path) -> str:
    cfg, m = rec["config"], rec["metrics"]
    keys = [setting_key(st["weight_decay"], st["mode"]) for st in cfg["settings"]]
    fig = new_figure((6.3 * len(keys), 9.0))
    axes = fig.subplots(2, len(keys), squeeze=False, sharex=True, gridspec_kw={"height_ratios": [1.5, 1.0]})
    tasks = list(range(1, cfg["tasks"] + 1))
    for j, key in enumerate(keys):
        judged = key in m["judged"]
        verdict = m["per_setting"][key]["verdict"]
        setting = cfg["settings"][j]
        ax = axes[0, j]
        handles = {}
        for z, name in enumerate(reversed(MODELS)):  # vanilla drawn last: on top where curves overlap at 0
            st = STYLE[name]
            (handles[name],) = ax.plot(tasks, m[key][name]["dead_frac_per_task"], lw=2, ms=5, zorder=3 + z, **st)
        level = REMEDY_MAX_RATIO * m[key]["rescaling"]["max_dead_frac"]
        thr = ax.axhline(level, color="0.5", lw=0.8, ls=":",
                         label=f"remedy threshold: {REMEDY_MAX_RATIO:g} x rescaling's largest ({level:.3f})")
        low = [n for n in MODELS if m[key][n]["max_dead_frac"] <= max(level, 0.01)]
        if low:
            ax.text(cfg["tasks"], 0.05, "at ~0 (overlapping): " + ", ".join(
                f"{n} max {m[key][n]['max_dead_frac']:.3f}" for n in low), fontsize=7.5, ha="right", color="0.25")
        ax.set_ylabel("dead parameters (fraction, |grad| <= %g)" % cfg["dead_tol"])
        ax.set_ylim(-0.03, 1.0)
        ax.grid(alpha=0.3)
        ax.legend([handles[n] for n in MODELS] + [thr], [STYLE[n]["label"] for n in MODELS] + [thr.get_label()],
                  fontsize=8, loc="upper left")
        title = (f"weight decay {setting['weight_decay']:g}"
                 + (f" {setting['mode']} (footnote 9's condition: judged)" if judged else " (reported)") + f":\n{verdict}")
        ax.set_title(title, fontsize=10.5, color=verdict_color(verdict) if judged else "0.3")
        ax = axes[1, j]
        for name in MODELS:
            st = dict(STYLE[name])
            st.pop("label")
            ax.plot(tasks, m[key][name]["probe_loss_per_task"], lw=1.6, ms=4, **st)
        ax.axhline(cfg["label_noise_std"] ** 2, color="0.5", lw=0.8, ls=":")
        ax.text(1, cfg["label_noise_std"] ** 2 * 1.05, "label noise variance", fontsize=8, color="0.4")
        ax.set_yscale("log")
        ax.set_xlabel("task")
        ax.set_ylabel("loss on fresh data after the task")
        if j == 0:
            ax.set_title(f"test loss (label noise variance {cfg['label_noise_std'] ** 2:g}; the signal's variance is "
                         f"only {1 / cfg['d']:g}, so staying near 0 costs little here)", fontsize=8.5)
        ax.set_xticks(tasks)
        ax.grid(alpha=0.3, which="both", lw=0.5)
    fig.suptitle(
        f"Fig. 3: loss of plasticity from the rescaling symmetry (d={cfg['d']}, {cfg['tasks']} tasks of "
        f"{cfg['points_per_task']} points, Adam betas=(0, 0.999), lr {cfg['lr']:g}, batch {cfg['batch_size']}, "
        f"{cfg['steps_per_task']:,} steps/task, {cfg['replicates']} replicates)",
        fontsize=11,
    )
    return save_figure(fig, out_dir, "fig3.png")


# ----------------------------------------------------------------------- run
def compute(cfg: dict, progress: bool = True) -> tuple[dict, None]:
    """Trains the task sequence and measures it; the figure reads the record (no plot data)."""
    return compute_metrics(train(cfg, progress), cfg), None


def _dead_first_last(m: dict) -> str:
    return ", ".join(f"{k} {m[k]['first_task_dead_frac']:.2f}->{m[k]['last_task_dead_frac']:.2f}" for k in MODELS)


def _headline(metrics: dict, cfg: dict) -> str:
    return "; ".join(f"{k}: dead first->last " + _dead_first_last(metrics[k]) for k in metrics["judged"])


def _notes(metrics: dict, cfg: dict) -> list[str]:
    notes = [
        "Not given by the paper: lr (0.1), label noise std (3), init scale (1), the dead-gradient tolerance; "
        "see config.",
        "Judged under footnote 9's condition (weight decay; settings " + ", ".join(metrics["judged"])
        + "): every criterion must hold in each.",
    ]
    for key, o in metrics["per_setting"].items():
        notes.append(f"Setting {key}: {o['verdict']}; dead first->last: " + _dead_first_last(metrics[key])
                     + (f". Weight decay 0 is {o['reason']}." if "reason" in o else ""))
    return notes


def _deviations(cfg: dict) -> list[dict]:
    out = [deviation("weight decay", "not stated (footnote 9 relies on it)",
                     ", ".join(f"{st['weight_decay']:g} {st['mode']}" for st in cfg["settings"]),
                     "footnote 9's condition, coupled (Adam) and decoupled (AdamW); 0 is reported, not judged"),
           deviation("lr and label noise", "not stated", f"lr {cfg['lr']:g}, label noise std {cfg['label_noise_std']:g}",
                     "chosen so the noise is large against the per-coordinate signal 1/d (eq. 9)")]
    for k, v in PAPER.items():
        if cfg[k] != v:
            reason = "quick mode (--full runs the paper's value)" if cfg["quick"] else "set by config override"
            out.append(deviation(k, v, cfg[k], reason))
    return out


def run(out_dir: str | Path, *, quick: bool = True, seed: int = 0, progress: bool = True,
        config: Optional[dict] = None) -> dict:
    """Train the continual-learning sequence; writes fig3.png, result.json and report.md into ``out_dir``."""
    return run_experiment(sys.modules[__name__], out_dir, quick=quick, seed=seed, progress=progress,
                          config=config, headline=_headline, notes=_notes, deviations=_deviations,
                          criteria=lambda metrics, cfg: [c for k in metrics["judged"] for c in _criteria(k)])
