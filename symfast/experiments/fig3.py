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
removed, and that point absorbs the dynamics exactly like the origin (paper footnote 9 says as much:
the biased symmetric point is "benign" *because weight decay* pulls away from it). The run therefore
judges the paper's stated setting (no weight decay) and reports a second setting with weight decay
1e-2 (footnote 9's condition) separately.
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
REMEDY_MAX = 0.02  # a remedy: at most 2% dead at every task (vanilla level)


def _criteria(prefix: str) -> list[Criterion]:
    return [
        Criterion(f"{prefix}.vanilla.max_dead_frac", "<=", VANILLA_MAX,
                  "vanilla (no symmetry) has no dead parameters at any task"),
        Criterion(f"{prefix}.rescaling.dead_growth", ">=", MIN_GROWTH,
                  "theta = w*u: the dead fraction grows from the first to the last task"),
        Criterion(f"{prefix}.rescaling+noise.max_dead_frac", "<=", REMEDY_MAX,
                  "gradient noise (var 1e-4) keeps dead parameters at the vanilla level at every task"),
        Criterion(f"{prefix}.rescaling+bias.max_dead_frac", "<=", REMEDY_MAX,
                  "a fixed random bias (var 1e-4) keeps dead parameters at the vanilla level at every task"),
    ]


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
        "weight_decays": [0.0, 1e-2],
        "weight_decay_mode": "coupled",
        "primary_weight_decay": 0.0,
        "probe_points": 1000,
        "dead_tol": 1e-6,
        "dtype": "float32",
        "data": "per task: x ~ N(0, I_d), y = sum(x)/d + label_noise_std * N(0, 1); 100 points; minibatches of 16 "
        "drawn with replacement",
        "loss": "mean over the minibatch of (theta . x - y)^2",
        "optimizer": "Adam with betas (0, 0.999) ('without momentum'), eps 1e-8, constant lr; weight decay as "
        "torch.optim.Adam's (wd * p added to the gradient); state reset at each task",
        "init": "w, u ~ init_scale * N(0, 1); vanilla starts from theta = w * u (same function); same init for all",
        "dead": "|gradient of the training objective on probe_points fresh points| <= dead_tol",
    }
    apply_overrides(cfg, overrides)
    if cfg["primary_weight_decay"] not in cfg["weight_decays"]:
        raise ValueError("primary_weight_decay must be one of weight_decays")
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
    S = len(cfg["weight_decays"])
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
    wds = torch.tensor(cfg["weight_decays"], dtype=dt)
    decoupled = cfg["weight_decay_mode"] == "decoupled"
    if cfg["weight_decay_mode"] not in ("coupled", "decoupled"):
        raise ValueError(f"weight_decay_mode must be 'coupled' or 'decoupled', got {cfg['weight_decay_mode']!r}")
    # coupled (torch.optim.Adam): wd * p joins the gradient; decoupled (torch.optim.AdamW): p *= 1 - lr * wd.
    wd_f = (torch.zeros_like(wds) if decoupled else wds).view(S, 1, 1, 1)
    wd_v = wd_f.view(S, 1, 1)
    shrink_f = (1 - lr * wds).view(S, 1, 1, 1) if decoupled else None

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
                if decoupled:
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
def wd_key(wd: float) -> str:
    """Metrics key of a weight-decay setting, without dots (criteria address metrics by dotted paths)."""
    return "wd_0" if wd == 0 else f"wd_{wd:.0e}"


def compute_metrics(out: dict, cfg: dict) -> dict:
    by_wd = {}
    for s, wd in enumerate(cfg["weight_decays"]):
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
        by_wd[wd_key(wd)] = per_model
    metrics = {
        "noise_floor": {"label_noise_variance": cfg["label_noise_std"] ** 2},
        "dead_definition": f"fraction of parameters with |probe gradient| <= {cfg['dead_tol']:g}",
        **by_wd,
    }
    primary = wd_key(cfg["primary_weight_decay"])
    metrics["primary"] = primary
    others = {}
    for key in by_wd:
        if key != primary:
            v, checks = judge(metrics, _criteria(key))
            others[key] = {"verdict": v, "checks": checks}
    metrics["other_settings"] = others
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
    keys = [wd_key(wd) for wd in cfg["weight_decays"]]
    fig = new_figure((6.3 * len(keys), 9.0))
    axes = fig.subplots(2, len(keys), squeeze=False, sharex=True, gridspec_kw={"height_ratios": [1.5, 1.0]})
    tasks = list(range(1, cfg["tasks"] + 1))
    for j, key in enumerate(keys):
        primary = key == m["primary"]
        verdict = rec["verdict"] if primary else m["other_settings"][key]["verdict"]
        wd = cfg["weight_decays"][j]
        ax = axes[0, j]
        handles = {}
        for z, name in enumerate(reversed(MODELS)):  # vanilla drawn last: on top where curves overlap at 0
            st = STYLE[name]
            (handles[name],) = ax.plot(tasks, m[key][name]["dead_frac_per_task"], lw=2, ms=5, zorder=3 + z, **st)
        thr = ax.axhline(REMEDY_MAX, color="0.5", lw=0.8, ls=":", label=f"remedy threshold {REMEDY_MAX:g}")
        low = [n for n in MODELS if m[key][n]["max_dead_frac"] <= REMEDY_MAX]
        if low:
            ax.text(cfg["tasks"], 0.05, "at ~0 (overlapping): " + ", ".join(
                f"{n} max {m[key][n]['max_dead_frac']:.3f}" for n in low), fontsize=7.5, ha="right", color="0.25")
        ax.set_ylabel("dead parameters (fraction, |grad| <= %g)" % cfg["dead_tol"])
        ax.set_ylim(-0.03, 1.0)
        ax.grid(alpha=0.3)
        ax.legend([handles[n] for n in MODELS] + [thr], [STYLE[n]["label"] for n in MODELS] + [thr.get_label()],
                  fontsize=8, loc="upper left")
        title = (f"weight decay {wd:g}" + (" (paper's setting: judged)" if primary else " (footnote 9's condition)")
                 + f": {verdict}")
        ax.set_title(title, fontsize=10.5, color=verdict_color(verdict))
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
    return (f"dead fraction first->last task (wd {cfg['primary_weight_decay']:g}): "
            + _dead_first_last(metrics[metrics["primary"]]))


def _notes(metrics: dict, cfg: dict) -> list[str]:
    notes = [
        "Not given by the paper: lr (0.1), label noise std (3), init scale (1), the dead-gradient tolerance; "
        "see config.",
        "Without weight decay the bias only moves the symmetric point to (w, u) = (-beta_w, -beta_u) (translation "
        "equivariance of Adam); footnote 9 says the biased point is benign because of weight decay.",
        "If the paper's 'Adam' was torch.optim.AdamW, its default decoupled weight decay of 1e-2 would supply "
        "footnote 9's condition; config={'weight_decay_mode': 'decoupled'} runs the second setting that way.",
    ]
    for key, o in metrics["other_settings"].items():
        notes.append(f"Setting {key} (not judged): {o['verdict']}; dead first->last: " + _dead_first_last(metrics[key]))
    return notes


def run(out_dir: str | Path, *, quick: bool = True, seed: int = 0, progress: bool = True,
        config: Optional[dict] = None) -> dict:
    """Train the continual-learning sequence; writes fig3.png, result.json and report.md into ``out_dir``."""
    return run_experiment(sys.modules[__name__], out_dir, quick=quick, seed=seed, progress=progress,
                          config=config, headline=_headline, notes=_notes,
                          criteria=lambda metrics, cfg: _criteria(metrics["primary"]))
