"""Figure 6 / App. A.4 at CPU scale: DCS (rescaling symmetry) on every parameter of a small CNN.

Paper: a ResNet18 on CIFAR-10, vanilla against "rescaling symmetry on each parameter" (theta = w * u, the spred
algorithm), SGD momentum 0.9, batch 128, cosine lr, 200 epochs, weight decay 5e-4 for both. Claims: the two reach
similar accuracy (~93%) in similar training time; the DCS model is very sparse (fraction of |theta| < 1e-6) and
"setting these parameters to zero has no discernible effect on the model performance"; DCS costs twice the memory of
vanilla at batch size 1 and under 10% more at batch size 128.

CPU-scale version: :class:`symfast.models.DigitsCNN` (Conv 1->16, Conv 16->32, MaxPool, Linear 512->64,
Linear 64->10; 38k parameters) on scikit-learn's bundled digits (80/20 split, no download). Every weight *and bias*
goes under elementwise DCS with :func:`symfast.convert` (``constrain_bias=True``), trained with
:func:`symfast.param_groups` (coupled weight decay ``2 alpha`` on the factors: the penalty ``alpha |w|^2 +
alpha |u|^2``, i.e. ``2 alpha |theta|_1`` at balance). Both arms: the same init (DCS starts from the same function),
the same minibatches, the same number of steps, SGD lr 0.1 with the paper's cosine schedule, momentum 0.9, batch 128.

Judged settings. The paper's run integrates its decay over 78,200 steps (200 epochs at batch 128): sum_t lr_t * wd =
0.1 * 5e-4 * 78,200 / 2 = 1.96 under the cosine schedule, for vanilla's weights and for DCS's factors alike. The CPU
run has fewer steps, so its weight decay is scaled up to keep that integral (``integrated_decay``): vanilla weight
decay wd = 2 * 1.96 / (lr * steps) and DCS alpha = wd / 2 (weight decay wd on both factors, as in the paper). The
record lists this under ``deviations``. Sparsity is judged at the paper's threshold, |theta| < 1e-6.

Two verdicts:

* ``verdict`` (accuracy, sparsity, time): the fraction of the network's parameters (materialized theta, biases
  included) with |theta| < 1e-6; the accuracy on the held-out 20% of the DCS model with every such parameter set
  to exactly zero, against vanilla; seconds per training step (mean over the run);
* ``memory_verdict``: bytes of parameters, gradients, momentum buffers and the tensors autograd saves for the
  backward pass (counted with ``saved_tensors_hooks``, parameters not double counted) for one training step at
  batch size 1 and 128: the terms that differ between vanilla and DCS (DCS adds a second factor, its gradient and
  momentum, and the materialized theta saved for the layer's backward). Counting needs no data, so it is done for
  the paper's ResNet18 on 32x32 inputs too, and the memory verdict is judged there (the paper's model); the CNN's
  count is reported. When a CUDA device is present, ``torch.cuda.max_memory_allocated`` over one training step is
  reported as well for both models. The paper does not say how it measured memory.

Paper scale (``config={'model': 'resnet18', 'data': PATH}``; ``symfast repro dcs-cnn --model resnet18 --data
PATH``): :class:`symfast.models.ResNet18` (CIFAR variant, 11.2M parameters) on CIFAR-10 (:mod:`.cifar`, the
python-version directory; random crop + flip), SGD momentum 0.9, batch 128, lr 0.1 with a cosine schedule to 0,
vanilla weight decay 5e-4 and DCS alpha 2.5e-4 (the paper's weight decay 5e-4 on both factors), the same init and
batches; every convolution and linear weight and the classifier's bias under DCS, while BatchNorm's affine
parameters (0.09% of the parameters; symfast has no DCS batch norm) keep the vanilla weight decay. Full: 200
epochs on the 50000 training images, alphas 2.5e-4 and 5e-4; quick: 5 epochs on a 10000-image subset, alpha
2.5e-4 (the settings are in :data:`CIFAR_SETTINGS`). Accuracy is on the 10000 test images (the paper's), under the
metrics' ``val_accuracy`` keys; the measurements, criteria and verdict are those above. It runs on the GPU when
there is one (timings synchronize the device).
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Optional

import torch
from tqdm import tqdm

import symfast
from symfast.nn import DCSLayer

from . import cifar
from .common import apply_overrides, Criterion, deviation, judge, make_record, new_figure, save_figure, torch_threads, verdict_color, write_record

EXPERIMENT = "dcs-cnn"
TITLE = "Figure 6 / App. A.4 at CPU scale: DCS (theta = w * u) on every parameter of a small CNN on digits"
CLAIM = (
    "Figure 6 / App. A.4: with rescaling symmetry on every parameter, 'the two models are similar in terms of training "
    "time and final performance', 'the model parameters is very sparse' and 'setting these parameters to zero has no "
    "discernible effect on the model performance'; DCS costs twice the memory at batch size 1, under 10% more at "
    "batch size 128."
)
CLAIM_SHORT = ("DCS on every parameter: comparable accuracy, very sparse, similar time; memory overhead small at "
               "batch 128")

MIN_SPARSITY = 0.5  # at the judged alpha: at least half of the parameters below the paper's 1e-6 ...
MAX_ACC_DROP = 0.02  # ... with the zeroed model within 2 points of vanilla
MAX_TIME_RATIO = 1.5  # "similar training time"
MAX_MEM_RATIO_BATCH = 1.10  # the paper's "< 10 percent" at batch size 128

#: App. A.4's settings; the integrated decay is sum_t lr_t * wd over 200 epochs of 391 steps under the cosine schedule.
PAPER = {"lr": 0.1, "lr_schedule": "cosine", "momentum": 0.9, "batch_size": 128, "steps": 78_200,
         "weight_decay": 5e-4, "zero_threshold": 1e-6, "integrated_decay": 0.1 * 5e-4 * 78_200 / 2}


def _criteria(primary: str) -> list[Criterion]:
    return [
        Criterion(f"{primary}.sparsity", ">=", MIN_SPARSITY,
                  "at the judged alpha, the fraction of parameters with |theta| < zero_threshold (the paper's 1e-6)"),
        Criterion(f"{primary}.zeroed_acc_drop_vs_vanilla", "<=", MAX_ACC_DROP,
                  "accuracy drop of the DCS model with those parameters set to 0, against vanilla"),
        Criterion(f"{primary}.time_ratio", "<=", MAX_TIME_RATIO,
                  "seconds per training step, DCS / vanilla"),
    ]


def _memory_criteria(key: str) -> list[Criterion]:
    return [Criterion(f"{key}.ratio_at_batch", "<=", MAX_MEM_RATIO_BATCH,
                      "training-step memory (params, grads, momentum, saved activations) DCS / vanilla at batch 128")]


def integrated_decay(cfg: dict, wd: float) -> float:
    """sum over the steps of lr_t * wd: lr * wd * steps for a constant lr, half that under the cosine schedule."""
    steps = cfg["steps"] if cfg["model"] == "digits_cnn" else cifar.steps_per_model(cfg)
    return cfg["lr"] * wd * steps * (0.5 if cfg["lr_schedule"] == "cosine" else 1.0)


#: ``model`` (``--model``): the default (digits CNN) and the paper's network (ResNet18 on CIFAR-10, with ``data``).
MODEL_CHOICES = ("digits_cnn", "resnet18")
_DEFAULT_DESC = "a small CNN on scikit-learn's bundled digits"
TITLE_CIFAR = "Figure 6 / App. A.4: DCS (theta = w * u) on every parameter of a ResNet18 on CIFAR-10"

#: The paper-scale run's quick and full settings (model='resnet18'); they override :func:`_cifar_config`'s base.
CIFAR_SETTINGS = {
    "quick": {"train_subset": 10_000, "epochs": 5, "alphas": [2.5e-4], "primary_alpha": 2.5e-4},
    "full": {"train_subset": None, "epochs": 200, "alphas": [2.5e-4, 5e-4], "primary_alpha": 2.5e-4},
}


def make_config(quick: bool = True, seed: int = 0, **overrides) -> dict:
    model, data = overrides.get("model", MODEL_CHOICES[0]), overrides.get("data")
    cifar.check_model_data(EXPERIMENT, model, data, default_model=MODEL_CHOICES[0], default_desc=_DEFAULT_DESC)
    if model == "resnet18":
        return _cifar_config(quick, seed, overrides)
    cfg = {
        "quick": quick,
        "seed": seed,
        "model": "digits_cnn",
        "data": None,
        "channels": 16,
        "hidden": 64,
        "val_fraction": 0.2,
        "batch_size": PAPER["batch_size"],
        "lr": PAPER["lr"],
        "lr_schedule": PAPER["lr_schedule"],  # both arms, per step, to 0 at the end
        "momentum": PAPER["momentum"],
        "steps": 4_000 if quick else 20_000,
        "integrated_decay": PAPER["integrated_decay"],
        # None: derived from integrated_decay (vanilla wd, and alpha = wd / 2: weight decay wd on both factors)
        "vanilla_weight_decay": None,
        "alphas": None,
        "primary_alpha": None,
        "zero_threshold": PAPER["zero_threshold"],
        "loose_threshold": 1e-3,  # reported: the fraction below 1e-3 as well
        "count_resnet18": True,  # count the training-step memory of the paper's ResNet18 too (no data needed)
        "data_desc": "scikit-learn load_digits via symfast.train.digits_data (1437 train / 360 validation images)",
        "optimizer": "torch.optim.SGD, lr_schedule (cosine: CosineAnnealingLR over the steps), momentum 0.9; DCS: "
        "symfast.param_groups (weight decay 2 alpha on the factors); vanilla: weight decay vanilla_weight_decay; "
        "batches drawn with replacement, the same for all",
    }
    apply_overrides(cfg, overrides)
    if cfg["lr_schedule"] not in ("cosine", "constant"):
        raise ValueError(f"lr_schedule must be 'cosine' or 'constant', got {cfg['lr_schedule']!r}")
    if cfg["vanilla_weight_decay"] is None:
        cfg["vanilla_weight_decay"] = cfg["integrated_decay"] / integrated_decay(cfg, 1.0)
    if cfg["alphas"] is None:
        cfg["alphas"] = [cfg["vanilla_weight_decay"] / 2]
    if cfg["primary_alpha"] is None:
        cfg["primary_alpha"] = cfg["alphas"][0]
    if cfg["primary_alpha"] not in cfg["alphas"]:
        raise ValueError("primary_alpha must be one of alphas")
    return cfg


def _cifar_config(quick: bool, seed: int, overrides: dict) -> dict:
    """The paper's setting (App. A.4): ResNet18 on CIFAR-10, vanilla against DCS on every parameter."""
    cfg = cifar.base_config(quick, seed)
    cfg.update({
        "epochs": 200,  # App. A.4
        "lr_schedule": "cosine",  # App. A.4: cosine, per step, to 0 at the end
        "vanilla_weight_decay": 5e-4,  # App. A.4 (both models)
        "free_weight_decay": 5e-4,  # DCS model: the parameters without a DCS twin (BatchNorm's affine)
        "alphas": [2.5e-4],  # 2.5e-4: weight decay 5e-4 on the factors (param_groups puts 2 alpha on them)
        "primary_alpha": 2.5e-4,
        "zero_threshold": PAPER["zero_threshold"],
        "loose_threshold": 1e-3,
        "data_desc": "CIFAR-10 (python version), uint8 images normalized per channel; training: random 32x32 crop "
        "of the 4-pixel zero-padded image and random horizontal flip; accuracy on the test images",
        "optimizer": "torch.optim.SGD, lr with a cosine schedule per step, momentum; DCS: symfast.param_groups "
        "(weight decay 2 alpha on the factors, free_weight_decay on BatchNorm's affine parameters); vanilla: weight "
        "decay vanilla_weight_decay; batches of batch_size from a seeded shuffle per epoch, the same for all",
    })
    cifar.finish_config(cfg, CIFAR_SETTINGS["quick" if quick else "full"], overrides)
    if cfg["primary_alpha"] not in cfg["alphas"]:
        raise ValueError("primary_alpha must be one of alphas")
    return cfg


def alpha_key(a: Optional[float]) -> str:
    """Metrics key without dots (criteria address metrics by dotted paths): 5e-4 -> alpha_5e-04, 2.5e-4 ->
    alpha_2p5e-04."""
    return "vanilla" if a is None else "alpha_" + f"{a:.1e}".replace(".0e", "e").replace(".", "p")


def make_model(cfg: dict, alpha: Optional[float]) -> torch.nn.Module:
    from symfast.models import DigitsCNN
    from symfast.models import ResNet18

    torch.manual_seed(int(cfg["seed"]))
    if cfg["model"] == "resnet18":
        net = ResNet18(10, width=cfg["resnet_width"])
    else:
        net = DigitsCNN(channels=cfg["channels"], hidden=cfg["hidden"])
    if alpha is not None:
        # every weight, and every bias there is (ResNet18's convolutions have none)
        net = symfast.convert(net, structure="elementwise", alpha=alpha, constrain_bias=True, warn=False)
    return net


def make_optimizer(cfg: dict, net: torch.nn.Module, alpha: Optional[float]) -> torch.optim.Optimizer:
    if alpha is None:
        groups = [{"params": list(net.parameters()), "weight_decay": cfg["vanilla_weight_decay"]}]
    else:
        groups = symfast.param_groups(net, weight_decay=cfg.get("free_weight_decay", 0.0))
    return torch.optim.SGD(groups, lr=cfg["lr"], momentum=cfg["momentum"])


def materialized(net: torch.nn.Module) -> list[torch.Tensor]:
    """Every parameter of the network as the function sees it (theta of DCS layers, biases included)."""
    with torch.no_grad():
        return [p.detach().clone() for p in symfast.export(net).parameters()]


@torch.no_grad()
def accuracy(net: torch.nn.Module, X: torch.Tensor, y: torch.Tensor) -> float:
    net.eval()
    acc = (net(X).argmax(1) == y).double().mean().item()
    net.train()
    return acc


@torch.no_grad()
def zeroed_copy(net: torch.nn.Module, threshold: float) -> torch.nn.Module:
    """A plain-torch copy with every parameter of size < threshold set to exactly zero."""
    plain = symfast.export(net) if any(isinstance(m, DCSLayer) for m in net.modules()) else copy.deepcopy(net)
    for p in plain.parameters():
        p.masked_fill_(p.abs() < threshold, 0.0)
    return plain


def train_one(cfg: dict, alpha: Optional[float], data, bar) -> dict:
    Xtr, ytr, Xva, yva = data
    net = make_model(cfg, alpha)
    opt = make_optimizer(cfg, net, alpha)
    sched = (torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg["steps"]) if cfg["lr_schedule"] == "cosine"
             else None)
    g = torch.Generator().manual_seed(int(cfg["seed"]) + 1)
    t = time.perf_counter()
    for s in range(cfg["steps"]):
        idx = torch.randint(0, len(Xtr), (cfg["batch_size"],), generator=g)
        loss = torch.nn.functional.cross_entropy(net(Xtr[idx]), ytr[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        if (s + 1) % 100 == 0:
            bar.update(100)
    bar.update(cfg["steps"] % 100)
    sec = time.perf_counter() - t
    theta = torch.cat([p.flatten() for p in materialized(net)])
    mags = theta.abs().double()
    out = {
        "alpha": alpha,
        "val_accuracy": accuracy(net, Xva, yva),
        "zeroed_val_accuracy": accuracy(zeroed_copy(net, cfg["zero_threshold"]), Xva, yva),
        "sparsity": (mags < cfg["zero_threshold"]).double().mean().item(),
        "sparsity_loose_threshold": (mags < cfg["loose_threshold"]).double().mean().item(),
        "parameters": int(theta.numel()),
        "trainable_tensors_numel": sum(p.numel() for p in net.parameters()),
        "seconds": sec,
        "seconds_per_step": sec / cfg["steps"],
        "final_loss": float(loss.detach()),
    }
    return out, mags.clamp_min(1e-12).log10().float()


def step_memory(cfg: dict, alpha: Optional[float], batch: int, X: torch.Tensor, y: torch.Tensor) -> dict:
    """Bytes of one training step: parameters, gradients, momentum buffers, tensors saved for backward
    (the model on ``X``'s device)."""
    net = make_model(cfg, alpha).to(X.device)
    opt = make_optimizer(cfg, net, alpha)
    param_ptrs = {p.data_ptr() for p in net.parameters()}
    saved: dict = {}

    def pack(t: torch.Tensor):
        if t.data_ptr() not in param_ptrs:
            saved[(t.data_ptr(), t.dtype, tuple(t.shape))] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = torch.nn.functional.cross_entropy(net(X[:batch]), y[:batch])
    loss.backward()
    opt.step()
    nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
    params = list(net.parameters())
    mom = [opt.state[p]["momentum_buffer"] for p in params if "momentum_buffer" in opt.state[p]]
    out = {
        "parameters": nbytes(params),
        "gradients": nbytes([p.grad for p in params if p.grad is not None]),
        "momentum": nbytes(mom),
        "saved_activations": sum(saved.values()),
    }
    out["total"] = sum(out.values())
    return out


def _memory(cfg: dict, X: torch.Tensor, y: torch.Tensor) -> dict:
    """Training-step memory of vanilla and DCS (the judged alpha) at batch 1 and ``batch_size``: ratios, DCS's
    extra bytes and the batch size where the overhead falls to 10% (``X``: normalized inputs, on the device)."""
    pa = cfg["primary_alpha"]
    mem = {}
    for b in (1, cfg["batch_size"]):
        v = step_memory(cfg, None, b, X, y)
        d = step_memory(cfg, pa, b, X, y)
        mem[f"batch_{b}"] = {"vanilla": v, "dcs": d, "ratio": d["total"] / v["total"]}
    mem["ratio_at_1"] = mem["batch_1"]["ratio"]
    big = mem[f"batch_{cfg['batch_size']}"]
    mem["ratio_at_batch"] = big["ratio"]
    # DCS's extra bytes do not depend on the batch size; vanilla's grow linearly with it (activations):
    # the batch size at which the overhead falls to 10%, by linear extrapolation of the two measurements.
    e1 = mem["batch_1"]["dcs"]["total"] - mem["batch_1"]["vanilla"]["total"]
    eb = big["dcs"]["total"] - big["vanilla"]["total"]
    v1, vb = mem["batch_1"]["vanilla"]["total"], big["vanilla"]["total"]
    per_sample = (vb - v1) / (cfg["batch_size"] - 1)
    mem["dcs_extra_bytes_at_1"], mem["dcs_extra_bytes_at_batch"] = e1, eb
    mem["batch_for_10pct_overhead"] = 1 + max(0.0, (eb / (MAX_MEM_RATIO_BATCH - 1) - v1) / per_sample)
    return mem


def _memory_note(cfg: dict, mem: dict, extra: str = "") -> str:
    return ("Memory is counted, not sampled from the allocator: parameters, gradients, momentum buffers and the "
            f"tensors autograd saves for backward during one step. {extra}DCS's extra bytes do not grow with the batch "
            f"size ({mem['dcs_extra_bytes_at_1']:,} at batch 1, {mem['dcs_extra_bytes_at_batch']:,} at batch "
            f"{cfg['batch_size']}); by linear extrapolation the overhead falls to 10% at batch "
            f"~{mem['batch_for_10pct_overhead']:.0f}.")


def resnet18_config(cfg: dict) -> dict:
    """``cfg`` with the paper's network (ResNet18, CIFAR variant, full width) for counting its memory."""
    return dict(cfg, model="resnet18", resnet_width=1.0)


def resnet18_memory(cfg: dict, device: torch.device = torch.device("cpu")) -> dict:
    """:func:`_memory` of the paper's ResNet18 on random 32x32 images (counting needs no data)."""
    g = torch.Generator().manual_seed(int(cfg["seed"]))
    b = cfg["batch_size"]
    X = torch.randn(b, 3, 32, 32, generator=g).to(device)
    y = torch.randint(0, 10, (b,), generator=g).to(device)
    return _memory(resnet18_config(cfg), X, y)


def cuda_peak_memory(cfg: dict, alpha: Optional[float], batch: int, X: torch.Tensor, y: torch.Tensor) -> int:
    """``torch.cuda.max_memory_allocated`` over building the model and one training step on ``X``'s CUDA device,
    above what was allocated before (the inputs)."""
    dev = X.device
    torch.cuda.synchronize(dev)
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    net = make_model(cfg, alpha).to(dev)
    opt = make_optimizer(cfg, net, alpha)
    loss = torch.nn.functional.cross_entropy(net(X[:batch]), y[:batch])
    loss.backward()
    opt.step()
    torch.cuda.synchronize(dev)
    peak = torch.cuda.max_memory_allocated(dev) - base
    del net, opt, loss
    return int(peak)


def cuda_memory(cfg: dict, X: torch.Tensor, y: torch.Tensor) -> dict:
    """Allocator peaks of vanilla and DCS at batch 1 and ``batch_size`` (``X``, ``y`` on a CUDA device)."""
    out = {}
    for b in (1, cfg["batch_size"]):
        v = cuda_peak_memory(cfg, None, b, X, y)
        d = cuda_peak_memory(cfg, cfg["primary_alpha"], b, X, y)
        out[f"batch_{b}"] = {"vanilla": v, "dcs": d, "ratio": d / v}
    out["ratio_at_1"] = out["batch_1"]["ratio"]
    out["ratio_at_batch"] = out[f"batch_{cfg['batch_size']}"]["ratio"]
    return out


def _all_memory(cfg: dict, X: torch.Tensor, y: torch.Tensor) -> dict:
    """Counted memory of the CPU-scale model (``memory``) and, with ``count_resnet18``, of ResNet18
    (``memory_resnet18``); allocator peaks of both when CUDA is present (``memory_cuda``, else None)."""
    out = {"memory": _memory(cfg, X, y)}
    if cfg.get("count_resnet18", False):
        out["memory_resnet18"] = resnet18_memory(cfg)
    out["memory_cuda"] = None
    if torch.cuda.is_available():
        dev = torch.device("cuda")
        b = cfg["batch_size"]
        g = torch.Generator().manual_seed(int(cfg["seed"]))
        Xr = torch.randn(b, 3, 32, 32, generator=g).to(dev)
        yr = torch.randint(0, 10, (b,), generator=g).to(dev)
        out["memory_cuda"] = {"device": torch.cuda.get_device_name(dev),
                              "small_model": cuda_memory(cfg, X.to(dev), y.to(dev)),
                              "resnet18": cuda_memory(resnet18_config(cfg), Xr, yr)}
    return out


def memory_verdict(metrics: dict, cfg: dict) -> dict:
    """The memory verdict (the paper's "< 10% more at batch 128"), judged on the counted memory of the paper's
    ResNet18 when it was counted, else of the CPU-scale model."""
    key = "memory_resnet18" if "memory_resnet18" in metrics else "memory"
    verdict, checks = judge(metrics, _memory_criteria(key))
    return {"verdict": verdict, "judged_on": key, "checks": checks,
            "criterion": f"reproduced iff DCS / vanilla training-step memory at batch {cfg['batch_size']} <= "
            f"{MAX_MEM_RATIO_BATCH:g} [{key}.ratio_at_batch] (counted; the paper does not say how it measured)"}


def _deviations(cfg: dict) -> list[dict]:
    """Where this run's settings differ from App. A.4 (see :func:`symfast.experiments.common.deviation`)."""
    out = []
    if cfg["model"] == "digits_cnn":
        out += [
            deviation("model and data", "ResNet18 on CIFAR-10 (11.2M parameters)",
                      "DigitsCNN on scikit-learn digits (38k parameters)", "CPU scale: minutes, not GPU-hours; "
                      "the memory count is made on ResNet18 too (it needs no data)"),
            deviation("minibatches", "epochs of a shuffled training set", "drawn with replacement",
                      "the steps and the integrated weight decay are matched, not the epochs"),
        ]
        steps = cfg["steps"]
    else:
        steps = cifar.steps_per_model(cfg)
    if steps != PAPER["steps"]:
        out.append(deviation("steps", PAPER["steps"], steps,
                             "CPU scale" + (" (quick mode)" if cfg["quick"] else "")
                             if cfg["model"] == "digits_cnn" else "quick mode or a smaller training set"))
    wd = cfg["vanilla_weight_decay"]
    here = integrated_decay(cfg, 2 * cfg["primary_alpha"])
    if wd != PAPER["weight_decay"] or 2 * cfg["primary_alpha"] != PAPER["weight_decay"]:
        out.append(deviation("weight decay (vanilla; DCS factors = 2 alpha)", PAPER["weight_decay"],
                             f"{wd:.3g}; {2 * cfg['primary_alpha']:.3g}",
                             f"scaled to the run's length: integrated decay sum lr_t * wd = {here:.2f} here, "
                             f"{PAPER['integrated_decay']:.2f} in the paper"))
    for k in ("lr", "lr_schedule", "momentum", "batch_size", "zero_threshold"):
        if cfg[k] != PAPER[k]:
            out.append(deviation(k, PAPER[k], cfg[k], "set by config override"))
    return out


def run(out_dir: str | Path, *, quick: bool = True, seed: int = 0, progress: bool = True,
        config: Optional[dict] = None) -> dict:
    """Train vanilla and DCS networks; writes dcs_cnn.png, result.json and report.md into ``out_dir``.

    The default trains the digits CNN; ``config={'model': 'resnet18', 'data': PATH}`` the paper's ResNet18 on
    CIFAR-10 (:func:`run_cifar`)."""
    cfg = make_config(quick, seed, **(config or {}))
    if cfg["model"] == "resnet18":
        return run_cifar(cfg, out_dir, progress=progress)
    with torch_threads():
        t0 = time.perf_counter()
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        from symfast.train.data import digits_data

        tr, va, _ = digits_data(val_fraction=cfg["val_fraction"], seed=int(cfg["seed"]))
        data = (*tr.tensors, *va.tensors)
        runs = [None] + list(cfg["alphas"])
        metrics, hists = {}, {}
        with tqdm(total=len(runs) * cfg["steps"], desc="dcs-cnn", unit="step", disable=not progress,
                  leave=False) as bar:
            for a in runs:
                metrics[alpha_key(a)], hists[alpha_key(a)] = train_one(cfg, a, data, bar)
        mem = _all_memory(cfg, data[0], data[1])
        notes = [
            "CPU scale: DigitsCNN (38k parameters) on scikit-learn's digits stands in for ResNet18 on CIFAR-10 "
            "(that setting: --model resnet18 --data PATH, config model='resnet18', data=PATH).",
            f"Both arms: {cfg['steps']} steps, lr {cfg['lr']:g} {cfg['lr_schedule']}, momentum {cfg['momentum']:g}; "
            f"integrated decay sum lr_t * wd = {integrated_decay(cfg, cfg['vanilla_weight_decay']):.2f} (vanilla) and "
            f"{integrated_decay(cfg, 2 * cfg['primary_alpha']):.2f} (DCS factors), the paper's "
            f"{PAPER['integrated_decay']:.2f}.",
            _memory_note(cfg, mem["memory"], "DigitsCNN: its activations are small against its parameters compared "
                         "with ResNet18 on 32x32 images, which makes the batch-128 ratio larger. "),
        ]
        if "memory_resnet18" in mem:
            notes.append("ResNet18 (counted on random 32x32 images): " + _memory_note(cfg, mem["memory_resnet18"]))
        notes.append("Allocator peak (torch.cuda.max_memory_allocated): "
                     + ("no CUDA device in this run." if mem["memory_cuda"] is None else
                        f"{mem['memory_cuda']['device']}: ResNet18 x{mem['memory_cuda']['resnet18']['ratio_at_1']:.2f} "
                        f"at batch 1, x{mem['memory_cuda']['resnet18']['ratio_at_batch']:.2f} at batch "
                        f"{cfg['batch_size']}; small model x{mem['memory_cuda']['small_model']['ratio_at_batch']:.2f}."))
        return _judge_and_write(cfg, metrics, hists, mem, out_dir, t0, notes, title=TITLE)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_one_cifar(cfg: dict, alpha: Optional[float], data, device: torch.device, bar) -> tuple[dict, torch.Tensor]:
    """One ResNet18 (vanilla when ``alpha`` is None, else DCS) on CIFAR-10 (uint8 tensors on ``device``); the
    metrics of :func:`train_one`, accuracies on the test images."""
    xtr, ytr, xte, yte = data
    if cfg["eval_points"] is not None:
        xte, yte = xte[: cfg["eval_points"]], yte[: cfg["eval_points"]]
    net = make_model(cfg, alpha).to(device)
    opt = make_optimizer(cfg, net, alpha)
    steps = cifar.steps_per_model(cfg)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps) if cfg["lr_schedule"] == "cosine" else None
    _sync(device)
    t = time.perf_counter()
    loss = cifar.train_epochs(net, opt, xtr, ytr, epochs=cfg["epochs"], batch_size=cfg["batch_size"],
                              seed=int(cfg["seed"]) + 1, augmentation=cfg["augmentation"], scheduler=sched,
                              on_step=lambda s: bar.update(1))
    _sync(device)
    sec = time.perf_counter() - t
    theta = torch.cat([p.flatten() for p in materialized(net)])
    mags = theta.abs().double().cpu()
    out = {
        "alpha": alpha,
        "val_accuracy": cifar.accuracy(net, xte, yte),
        "zeroed_val_accuracy": cifar.accuracy(zeroed_copy(net, cfg["zero_threshold"]), xte, yte),
        "sparsity": (mags < cfg["zero_threshold"]).double().mean().item(),
        "sparsity_loose_threshold": (mags < cfg["loose_threshold"]).double().mean().item(),
        "parameters": int(theta.numel()),
        "trainable_tensors_numel": sum(p.numel() for p in net.parameters()),
        "seconds": sec,
        "seconds_per_step": sec / steps,
        "final_loss": loss,
    }
    return out, mags.clamp_min(1e-12).log10().float()


def run_cifar(cfg: dict, out_dir: str | Path, *, progress: bool = True) -> dict:
    """The paper's setting: vanilla and DCS ResNet18 on CIFAR-10 (GPU when available), judged like the CNN."""
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg, data, device = cifar.prepare("dcs-cnn", cfg)
    xtr, ytr, xte, yte = data
    n_full = cfg["train_images_available"]
    steps = cifar.steps_per_model(cfg)
    runs = [None] + list(cfg["alphas"])
    metrics, hists = {}, {}
    with tqdm(total=len(runs) * steps, desc="dcs-cnn (ResNet18, CIFAR-10)", unit="step", disable=not progress,
              leave=False) as bar:
        for a in runs:
            metrics[alpha_key(a)], hists[alpha_key(a)] = train_one_cifar(cfg, a, data, device, bar)
    b = cfg["batch_size"]
    mem = {"memory": _memory(cfg, cifar.normalize(data[0][:b]), data[1][:b]), "memory_cuda": None}
    if device.type == "cuda":
        mem["memory_cuda"] = {"device": torch.cuda.get_device_name(device),
                              "resnet18": cuda_memory(cfg, cifar.normalize(data[0][:b]), data[1][:b])}
    n_bn = sum(p.numel() for m in make_model(cfg, None).modules() if isinstance(m, torch.nn.BatchNorm2d)
               for p in m.parameters())
    sub = f" (a seeded subset of the {n_full})" if len(ytr) < n_full else ""
    van = metrics["vanilla"]
    notes = [
        f"Paper scale: ResNet18 (CIFAR variant, width x{cfg['resnet_width']:g}, {van['parameters']:,} parameters) "
        f"on CIFAR-10 from {cfg['data_dir']}; device {cfg['device']}.",
        "DCS (elementwise, symfast.convert with constrain_bias=True) on every convolution and linear weight and the "
        f"classifier's bias; the {n_bn:,} BatchNorm affine parameters ({n_bn / van['parameters']:.2%}) have no DCS "
        f"twin and keep plain weight decay {cfg['free_weight_decay']:g}; they count in the sparsity.",
        f"{cfg['epochs']} epochs (App. A.4: 200) on {len(ytr)} training images{sub}, SGD batch {b}, lr "
        f"{cfg['lr']:g} ({cfg['lr_schedule']}), momentum {cfg['momentum']:g}, vanilla weight decay "
        f"{cfg['vanilla_weight_decay']:g}"
        + (", random crop + flip augmentation" if cfg["augmentation"] else ", no augmentation")
        + f"; accuracy (metrics' val_accuracy) on {cfg['eval_points'] or len(yte)} test images.",
        f"Sparsity is judged at |theta| < {cfg['zero_threshold']:g} (every such parameter is then set to exactly 0 "
        "and the accuracy re-measured).",
        _memory_note(cfg, mem["memory"]),
    ]
    return _judge_and_write(cfg, metrics, hists, mem, out_dir, t0, notes, title=TITLE_CIFAR)


def _judge_and_write(cfg: dict, metrics: dict, hists: dict, mem: dict, out_dir: Path, t0: float, notes: list,
                     *, title: str) -> dict:
    """The comparisons with vanilla, the headline, the record (verdict by :func:`_criteria`) and the figure."""
    van = metrics["vanilla"]
    for a in cfg["alphas"]:
        m = metrics[alpha_key(a)]
        m["acc_drop_vs_vanilla"] = van["val_accuracy"] - m["val_accuracy"]
        m["zeroed_acc_drop_vs_vanilla"] = van["val_accuracy"] - m["zeroed_val_accuracy"]
        m["time_ratio"] = m["seconds_per_step"] / van["seconds_per_step"]
    pa = cfg["primary_alpha"]
    metrics.update(mem)
    mem = mem["memory_resnet18"] if "memory_resnet18" in mem else mem["memory"]
    primary = alpha_key(pa)
    metrics["primary"] = primary
    p = metrics[primary]
    mv = memory_verdict(metrics, cfg)
    headline = (
        f"alpha {pa:.3g}: sparsity {p['sparsity']:.1%} (|theta| < {cfg['zero_threshold']:g}; "
        f"{p['sparsity_loose_threshold']:.1%} < {cfg['loose_threshold']:g}), acc zeroed {p['zeroed_val_accuracy']:.3f} "
        f"vs vanilla {van['val_accuracy']:.3f}; time x{p['time_ratio']:.2f}; memory ({mv['verdict']}, counted, "
        f"{mv['judged_on']}) x{mem['ratio_at_1']:.2f} at batch 1, x{mem['ratio_at_batch']:.2f} at batch "
        f"{cfg['batch_size']}"
    )
    notes = list(notes)
    for a in cfg["alphas"]:
        m = metrics[alpha_key(a)]
        notes.append(f"alpha {a:g}: acc {m['val_accuracy']:.3f}, zeroed {m['zeroed_val_accuracy']:.3f}, sparsity "
                     f"{m['sparsity']:.3f} (< {cfg['loose_threshold']:g}: {m['sparsity_loose_threshold']:.3f}), "
                     f"time x{m['time_ratio']:.2f}")
    rec = make_record(experiment=EXPERIMENT, title=title, claim=CLAIM, claim_short=CLAIM_SHORT,
                      criteria=_criteria(primary), metrics=metrics, config=cfg, headline=headline, notes=notes,
                      deviations=_deviations(cfg))
    rec["memory_verdict"] = mv
    fig = _plot(rec, hists, out_dir)
    return write_record(rec, out_dir, t0=t0, figures=[fig])


def _plot(rec: dict, hists: dict, out_dir: Path) -> str:
    cfg, m = rec["config"], rec["metrics"]
    fig = new_figure((16.5, 5.0))
    axes = fig.subplots(1, 3, gridspec_kw={"width_ratios": [1.1, 1.2, 1.0]})
    van = m["vanilla"]
    # (1) accuracy against sparsity
    ax = axes[0]
    ax.scatter([van["sparsity"]], [van["val_accuracy"]], marker="*", s=220, color="k", zorder=4,
               label=f"vanilla (wd {cfg['vanilla_weight_decay']:g})")
    ax.scatter([van["sparsity"]], [van["zeroed_val_accuracy"]], marker="*", s=120, facecolor="none",
               edgecolor="k", zorder=4, label="vanilla, params < zero threshold set to 0")
    xs = [m[alpha_key(a)]["sparsity"] for a in cfg["alphas"]]
    ax.plot(xs, [m[alpha_key(a)]["val_accuracy"] for a in cfg["alphas"]], "o-", color="tab:red", ms=7,
            label="DCS (every parameter)")
    ax.plot(xs, [m[alpha_key(a)]["zeroed_val_accuracy"] for a in cfg["alphas"]], "s--", color="tab:blue",
            mfc="none", ms=9, label=f"DCS, params < {cfg['zero_threshold']:g} set to 0")
    for i, (a, x) in enumerate(zip(cfg["alphas"], xs)):
        ax.annotate(f"alpha {a:g}", (x, m[alpha_key(a)]["val_accuracy"]), textcoords="offset points",
                    xytext=(-34, -14 if i % 2 == 0 else 9), fontsize=8)
    ax.axhline(van["val_accuracy"] - MAX_ACC_DROP, color="0.5", ls=":", lw=0.8,
               label=f"vanilla - {MAX_ACC_DROP:g} (criterion)")
    ax.set_xlim(-0.03, 1.05)
    accs = [van["val_accuracy"]] + [m[alpha_key(a)]["zeroed_val_accuracy"] for a in cfg["alphas"]]
    lo = min([v for v in accs if v >= 0.5] or [0.0])
    ax.set_ylim(max(0.0, lo - 0.05), 1.0)
    collapsed = [a for a in cfg["alphas"] if m[alpha_key(a)]["val_accuracy"] < max(0.0, lo - 0.05)]
    if collapsed:
        ax.text(1.03, 0.998, "off the axis (collapsed to 0, chance accuracy):\n" + ", ".join(
            f"alpha {a:g} (acc {m[alpha_key(a)]['val_accuracy']:.2f})" for a in collapsed), fontsize=7.5,
            ha="right", va="top", color="tab:red")
    ax.set_xlabel(f"sparsity (fraction of parameters with |theta| < {cfg['zero_threshold']:g})")
    ax.set_ylabel("validation accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7.5, loc="lower left")
    ax.set_title("accuracy vs sparsity", fontsize=10)
    # (2) histogram of parameter magnitudes
    ax = axes[1]
    bins = torch.linspace(-12, 1, 53)
    colors = ["tab:orange", "tab:red", "tab:purple", "tab:brown", "tab:olive", "tab:pink"]
    series = [("vanilla", "k", f"vanilla (wd {cfg['vanilla_weight_decay']:g})")]
    series += [(alpha_key(a), c, f"DCS alpha {a:g}") for a, c in zip(cfg["alphas"], colors)]
    for key, color, label in series:
        ax.hist(hists[key].numpy(), bins=bins.numpy(), histtype="step", lw=1.6, color=color, label=label)
    ax.axvline(torch.log10(torch.tensor(cfg["zero_threshold"])).item(), color="tab:blue", ls="--", lw=1,
               label=f"zero threshold {cfg['zero_threshold']:g}")
    ax.axvline(torch.log10(torch.tensor(cfg["loose_threshold"])).item(), color="0.4", ls=":", lw=1,
               label=f"reported threshold {cfg['loose_threshold']:g}")
    ax.set_yscale("log")
    ax.set_xlabel("log10 |theta| (materialized parameters; exact 0 drawn at -12)")
    ax.set_ylabel("number of parameters")
    ax.legend(fontsize=7.5, loc="upper left")
    ax.grid(alpha=0.3)
    ax.set_title("parameter magnitudes after training", fontsize=10)
    # (3) overhead
    ax = axes[2]
    mv = rec["memory_verdict"]
    mem = m[mv["judged_on"]]
    b = cfg["batch_size"]
    which = "ResNet18" if mv["judged_on"] == "memory_resnet18" else "this model"
    labels = ["time / step", f"memory, batch 1\n({which}, counted)", f"memory, batch {b}\n({which}, counted)"]
    vals = [m[m["primary"]]["time_ratio"], mem["ratio_at_1"], mem["ratio_at_batch"]]
    bars = ax.bar(labels, vals, color=["tab:gray", "tab:cyan", "tab:blue"])
    limits = [MAX_TIME_RATIO, None, MAX_MEM_RATIO_BATCH]
    for bb, v, lim in zip(bars, vals, limits):
        verdict = "" if lim is None else (f" (<= {lim:g}: passes)" if v <= lim else f" (> {lim:g}: fails)")
        ax.text(bb.get_x() + bb.get_width() / 2, v + 0.03, f"x{v:.2f}{verdict}", ha="center", fontsize=8.5,
                color="k" if lim is None or v <= lim else "tab:red")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.axhline(MAX_MEM_RATIO_BATCH, color="tab:blue", ls=":", lw=0.8,
               label=f"paper: < x{MAX_MEM_RATIO_BATCH} at batch 128")
    ax.axhline(MAX_TIME_RATIO, color="tab:gray", ls=":", lw=0.8, label=f"criterion: time <= x{MAX_TIME_RATIO}")
    ax.set_ylabel(f"DCS / vanilla (alpha {cfg['primary_alpha']:g})")
    ax.set_ylim(0, max(vals + [MAX_TIME_RATIO]) * 1.2)
    ax.legend(fontsize=7.5, loc="upper right")
    ax.grid(alpha=0.3, axis="y")
    ax.set_title(f"overhead of DCS (memory verdict: {mv['verdict']})", fontsize=10)
    if cfg["model"] == "resnet18":
        title = (f"Fig. 6: DCS on every parameter of a ResNet18 on CIFAR-10 ({m['vanilla']['parameters']:,} "
                 f"parameters, {cfg['epochs']} epochs on {cfg['train_images']:,} images, batch {b}, lr {cfg['lr']:g} "
                 f"{cfg['lr_schedule']}, momentum {cfg['momentum']:g}): {rec['verdict']}; memory {mv['verdict']}")
    else:
        title = (f"Fig. 6 at CPU scale: DCS on every parameter of a CNN on digits ({m['vanilla']['parameters']:,} "
                 f"parameters, {cfg['steps']:,} SGD steps, batch {b}, lr {cfg['lr']:g} {cfg['lr_schedule']}, momentum "
                 f"{cfg['momentum']:g}): {rec['verdict']}; memory {mv['verdict']}")
    fig.suptitle(title, fontsize=11, color=verdict_color(rec["verdict"]))
    return save_figure(fig, out_dir, "dcs_cnn.png")
