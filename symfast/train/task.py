r"""``symfast train``: one run = a DCS model, its export, and the magnitude-pruning baseline of the same budget.

1. The model is converted (:func:`symfast.convert`, every Linear/Conv/Embedding) and trained with
   :func:`fit` on ``loss + penalty`` for ``steps`` steps.
2. It is exported (:func:`symfast.export` with ``threshold``); ``sparsity`` is the zero fraction of
   the converted weights of the exported model, and ``val_loss`` is measured on the exported model.
3. Baseline, in the same run: the dense model, from the same initialization, trained for the same
   ``steps`` with the same optimizer and schedule; then ``torch.nn.utils.prune.global_unstructured``
   (L1) prunes the same layers to the same number of zeros; then it is fine-tuned with its mask for
   10% of the budget (lr / 10); its validation loss is ``magnitude_pruning_val_loss``.
4. ``DIR/metrics.json``, ``DIR/training.png`` (loss and sparsity against steps), ``DIR/exported.pt``.
"""

from __future__ import annotations

import copy
import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.utils import prune

from ..convert import convert, export, sparsity_report
from .data import digits_data, lm_data
from .loop import evaluate, fit
from .models import ByteTransformer, DigitsCNN

__all__ = ["TrainConfig", "run", "prune_like", "inference_speedup"]

TASKS = ("lm", "digits")


@dataclass
class TrainConfig:
    """Every setting of a run (``symfast train`` flags). ``None`` means the task's default (see :func:`defaults`)."""

    task: str = "lm"
    structure: str = "elementwise"
    alpha: Optional[float] = None
    steps: Optional[int] = None
    batch_size: Optional[int] = None
    lr: Optional[float] = None
    optimizer: str = "adam"
    threshold: Optional[float] = None
    width: Optional[int] = None
    depth: Optional[int] = None
    context: Optional[int] = None
    quick: bool = False
    seed: int = 0
    eval_every: Optional[int] = None
    finetune_fraction: float = 0.1
    eval_samples: Optional[int] = None

    def resolved(self) -> "TrainConfig":
        d = defaults(self.task, self.structure, quick=self.quick)
        out = copy.copy(self)
        for k, v in d.items():
            if getattr(out, k) is None:
                setattr(out, k, v)
        return out


def defaults(task: str, structure: str, *, quick: bool) -> Dict[str, Any]:
    """The task's default settings (the values chosen so that ``--quick`` reaches sparsity >= 0.5 in about a minute)."""
    if task not in TASKS:
        raise ValueError(f"symfast train: task must be one of {TASKS}, got {task!r}")
    if task == "lm":
        d = dict(width=128, depth=2, context=64, steps=1500, batch_size=32, lr=3e-3, alpha=3e-4, threshold=1e-2,
                 eval_samples=1024)
        if quick:
            d.update(width=64, depth=2, context=32, steps=200, eval_samples=256)
    else:
        d = dict(width=16, depth=None, context=None, steps=600, batch_size=64, lr=3e-3, alpha=3e-4, threshold=1e-2,
                 eval_samples=None)
        if quick:
            d.update(steps=300)
    return d


def build(cfg: TrainConfig):
    """``(model, train, val, info)`` for a resolved config; the model is initialized from ``cfg.seed``."""
    torch.manual_seed(cfg.seed)
    if cfg.task == "lm":
        train, val, info = lm_data(context=cfg.context)
        model = ByteTransformer(width=cfg.width, depth=cfg.depth, heads=4, context=cfg.context)
    else:
        train, val, info = digits_data(seed=cfg.seed)
        model = DigitsCNN(channels=cfg.width, hidden=8 * cfg.width)
    return model, train, val, info


def _weighted_modules(model: nn.Module, names) -> list:
    return [(model.get_submodule(n), "weight") for n in names]


def prune_like(model: nn.Module, names, zeros: int) -> None:
    """Global L1 magnitude pruning of the ``weight`` of the modules ``names`` to exactly ``zeros`` zeros (masks stay)."""
    prune.global_unstructured(_weighted_modules(model, names), pruning_method=prune.L1Unstructured, amount=int(zeros))


@torch.inference_mode()
def inference_speedup(dense: nn.Module, small: nn.Module, x: torch.Tensor, *, repeats: int = 50) -> Dict[str, float]:
    """Median forward time of ``dense`` and ``small`` on ``x`` (eval mode, after warm-up) and their ratio.

    The two are timed alternately, so a change in machine load (a shared CPU) hits both alike.
    """
    models = {"dense": dense, "exported": small}
    times: Dict[str, list] = {k: [] for k in models}
    for m in models.values():
        m.eval()
        for _ in range(3):
            m(x)
    for _ in range(repeats):
        for k, m in models.items():
            if x.is_cuda:
                torch.cuda.synchronize()
            t = time.perf_counter()
            m(x)
            if x.is_cuda:
                torch.cuda.synchronize()
            times[k].append(time.perf_counter() - t)
    res: Dict[str, Any] = {f"{k}_ms": 1e3 * sorted(v)[len(v) // 2] for k, v in times.items()}
    res["speedup"] = res["dense_ms"] / res["exported_ms"]
    res["batch_shape"] = list(x.shape)
    res["device"] = str(x.device)
    return res


def _plot(path: Path, sparse_hist, dense_hist, ft_hist, steps: int, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    s = [h["step"] for h in sparse_hist]
    a.plot(s, [h["loss"] for h in sparse_hist], color="C0", alpha=0.35, lw=0.8, label="DCS train")
    a.plot(*zip(*[(h["step"], h["val_loss"]) for h in sparse_hist if "val_loss" in h]), "o-", color="C0",
           label="DCS val")
    a.plot([h["step"] for h in dense_hist], [h["loss"] for h in dense_hist], color="C1", alpha=0.35, lw=0.8,
           label="dense train")
    a.plot(*zip(*[(h["step"], h["val_loss"]) for h in dense_hist if "val_loss" in h]), "s-", color="C1",
           label="dense val")
    if ft_hist:
        a.plot(*zip(*[(steps + h["step"], h["val_loss"]) for h in ft_hist if "val_loss" in h]), "^-", color="C3",
               label="magnitude-pruned, fine-tune val")
    a.set_xlabel("step")
    a.set_ylabel("loss")
    a.set_yscale("log")
    a.legend(fontsize=8)
    a.set_title("loss")
    pts = [(h["step"], h["sparsity"]) for h in sparse_hist if "sparsity" in h]
    b.plot(*zip(*pts), "o-", color="C0", label="DCS (zero fraction after threshold)")
    b.set_ylim(0, 1)
    b.set_xlabel("step")
    b.set_ylabel("sparsity of converted weights")
    b.legend(fontsize=8)
    b.set_title("sparsity")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(cfg: TrainConfig, out: str | os.PathLike, *, resume: bool = False, stop_after: Optional[int] = None,
        progress: bool = True, device=None) -> Optional[Dict[str, Any]]:
    """Runs ``symfast train`` with ``cfg``; writes ``out/metrics.json`` etc. Returns the metrics (``None`` if stopped)."""
    t0 = time.time()
    cfg = cfg.resolved()
    out = Path(out)
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    device = torch.device(device) if device is not None else torch.device("cpu")
    dense, train, val, data_info = build(cfg)
    dense = dense.to(device)
    init_state = copy.deepcopy(dense.state_dict())
    params_before = sum(p.numel() for p in dense.parameters())

    sparse = convert(copy.deepcopy(dense), structure=cfg.structure, alpha=cfg.alpha, warn=False)
    report = sparse.dcs_report
    converted = [n for n, _, _ in report.converted]
    common = dict(batch_size=cfg.batch_size, optimizer=cfg.optimizer, seed=cfg.seed, eval_every=cfg.eval_every,
                  eval_samples=cfg.eval_samples,
                  progress=progress, device=device, resume=resume)
    ck = out / "checkpoints"

    r_sparse = fit(sparse, train, val, steps=cfg.steps, lr=cfg.lr, sparsity_threshold=cfg.threshold,
                   checkpoint=ck / "dcs.pt", stop_after=stop_after, desc=f"DCS {cfg.structure}", **common)
    if r_sparse.stopped_early:
        return None
    exported = export(sparse, threshold=cfg.threshold)
    rep = sparsity_report(sparse, threshold=cfg.threshold)
    zeros = sum(r["zeros"] for r in rep.rows)
    numel = sum(r["numel"] for r in rep.rows)
    sparsity = zeros / numel
    final_n = None if cfg.eval_samples is None else 4 * cfg.eval_samples
    ev = evaluate(exported, val, device=device, max_samples=final_n)

    # ---- baseline: same budget dense, global magnitude pruning to the same zeros, 10% fine-tune with the mask
    dense.load_state_dict(init_state)
    r_dense = fit(dense, train, val, steps=cfg.steps, lr=cfg.lr, checkpoint=ck / "dense.pt",
                  desc="dense baseline", **common)
    dense_val = evaluate(dense, val, device=device, max_samples=final_n)
    trained_dense = copy.deepcopy(dense)
    prune_like(dense, converted, zeros)
    ft_steps = max(1, round(cfg.finetune_fraction * cfg.steps))
    r_ft = fit(dense, train, val, steps=ft_steps, lr=cfg.lr / 10, warmup=0, checkpoint=ck / "finetune.pt",
               desc="prune + fine-tune", **{**common, "seed": cfg.seed + 1})
    for m, name in _weighted_modules(dense, converted):
        prune.remove(m, name)
    base_zeros = sum(int((dense.get_submodule(n).weight == 0).sum()) for n in converted)
    base = evaluate(dense, val, device=device, max_samples=final_n)

    speed = None
    if cfg.structure == "group":
        x = torch.stack([val[i][0] for i in range(min(len(val), 64))]).to(device)
        speed = inference_speedup(trained_dense, exported, x)

    metrics: Dict[str, Any] = {
        "task": cfg.task,
        "structure": cfg.structure,
        "alpha": cfg.alpha,
        "steps": cfg.steps,
        "sparsity": sparsity,
        "val_loss": ev["loss"],
        "val_accuracy": ev.get("accuracy") if cfg.task == "digits" else None,
        "params_before": params_before,
        "params_after": sum(p.numel() for p in exported.parameters()),
        "nonzero_params_after": int(sum(int((p != 0).sum()) for p in exported.parameters())),
        "magnitude_pruning_val_loss": base["loss"],
        "magnitude_pruning_val_accuracy": base.get("accuracy") if cfg.task == "digits" else None,
        "magnitude_pruning_sparsity": base_zeros / numel,
        "dense_val_loss": dense_val["loss"],
        "dense_val_accuracy": dense_val.get("accuracy") if cfg.task == "digits" else None,
        "val_byte_accuracy": ev.get("accuracy") if cfg.task == "lm" else None,
        "inference": speed,
        "ranks": ({r["name"]: [r["rank"], r["full_rank"]] for r in rep.rows} if cfg.structure == "lowrank" else None),
        "threshold": cfg.threshold,
        "converted": converted,
        "not_converted": [n for n, *_ in report.not_converted],
        "config": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__},
        "finetune_steps": ft_steps,
        "data": data_info,
        "world_size": world,
        "resumed_from": r_sparse.resumed_from,
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "seconds": time.time() - t0,
        "history": {"dcs": r_sparse.history, "dense": r_dense.history, "finetune": r_ft.history},
    }
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        torch.save(exported, out / "exported.pt")
        title = (f"{cfg.task}, {cfg.structure}, alpha={cfg.alpha:g}: DCS val {ev['loss']:.3f} at sparsity "
                 f"{sparsity:.2f} vs magnitude pruning {base['loss']:.3f}")
        _plot(out / "training.png", r_sparse.history, r_dense.history, r_ft.history, cfg.steps, title)
        (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    return metrics
