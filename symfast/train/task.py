r"""``symfast train``: one run = a DCS model, its export, and the magnitude-pruning baseline of the same budget.

1. The model is converted (:func:`symfast.convert`, every Linear/Conv/Embedding) and trained with
   :func:`fit` on ``loss + penalty`` for ``steps`` steps.
2. It is exported (:func:`symfast.export` with ``threshold``); ``sparsity`` is the zero fraction of
   the converted weights of the exported model, and ``val_loss`` is measured on the exported model.
3. Baseline, in the same run: the dense model, from the same initialization, trained for the same
   ``steps`` with the same optimizer and schedule; then ``torch.nn.utils.prune.global_unstructured``
   (L1) prunes the same layers to the same number of zeros; then it is fine-tuned with its mask for
   10% of the budget (lr / 10); its validation loss is ``magnitude_pruning_val_loss``.
4. For ``structure="lowrank"`` also the truncated-SVD baseline (:func:`svd_truncate`): each converted
   weight of the same trained dense model becomes its best rank-r approximation, r = the rank of
   the exported DCS layer, held as two factors; fine-tuned in that factorized form (so the rank
   stays <= r) for the same 10% of the budget at lr / 10; ``svd_truncation_val_loss``.
5. ``DIR/metrics.json``, ``DIR/training.png`` (loss and sparsity against steps; for lowrank the
   per-layer ranks instead of sparsity), ``DIR/exported.pt``
   (and ``DIR/svd_truncation.pt``, the exported SVD baseline, for lowrank).

``--resume`` first compares the run's settings with ``DIR/checkpoints/config.json`` (written when
the run started): any difference except :data:`RESUME_MAY_DIFFER` is a :class:`ResumeMismatch`
(a ``ValueError``). Each phase checkpoint records the run's settings too, and one written with
other settings (or by an older symfast, which recorded none) is not reused: that phase is trained
again. A run without ``resume`` starts clean: it first removes an earlier run's checkpoints and
outputs from ``DIR``. A non-finite result is a :class:`NonFiniteMetrics` error, and nothing is written.
"""

from __future__ import annotations

import copy
import json
import math
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional

import torch
import torch.distributed as dist
from torch import nn

from ..conversion import convert
from ..exporting import export, sparsity_report
from ..models import ByteTransformer, DigitsCNN
from .baselines import inference_speedup, make_pruning_permanent, prune_like, svd_truncate
from .checkpoints import (
    PHASE_FILES,
    RESUME_MAY_DIFFER,
    ResumeMismatch,
    check_resume_config,
    config_dict,
    phase_meta,
    phase_mismatch,
    remove_earlier_run,
    write_config,
)
from .data import digits_data, lm_data
from .loop import evaluate, fit
from .plots import plot_run

__all__ = ["TrainConfig", "run", "prune_like", "svd_truncate", "inference_speedup", "check_resume_config",
           "RESUME_MAY_DIFFER", "ResumeMismatch", "NonFiniteMetrics"]

TASKS = ("lm", "digits")
PARALLEL = ("ddp", "fsdp")
#: Attention heads of the lm task's transformer: ``width`` must be divisible by it.
LM_HEADS = 4
#: Settings that only the lm task has (digits has neither blocks nor a context).
LM_ONLY = ("depth", "context")


class NonFiniteMetrics(RuntimeError):
    """A run whose results are not finite (it diverged, or a setting is degenerate); nothing was written."""


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
        if self.task != "lm":
            given = [k for k in LM_ONLY if getattr(self, k) is not None]
            if given:
                raise ValueError(f"symfast train: {' and '.join(given)} apply only to task 'lm', not {self.task!r}")
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
        model = ByteTransformer(width=cfg.width, depth=cfg.depth, heads=LM_HEADS, context=cfg.context)
    else:
        train, val, info = digits_data(seed=cfg.seed)
        model = DigitsCNN(channels=cfg.width, hidden=8 * cfg.width)
    return model, train, val, info


def _non_finite(x: Any) -> bool:
    if isinstance(x, float):
        return not math.isfinite(x)
    if isinstance(x, dict):
        return any(_non_finite(v) for v in x.values())
    if isinstance(x, (list, tuple)):
        return any(_non_finite(v) for v in x)
    return False


def _check_finite(metrics: Dict[str, Any], out: Path) -> None:
    """:class:`NonFiniteMetrics` naming every result that is nan or inf (JSON has no such numbers)."""
    bad = [f"{k} {v}" if isinstance(v, float) else k for k, v in metrics.items()
           if k != "history" and _non_finite(v)]
    for phase, hist in metrics["history"].items():
        steps = [h["step"] for h in hist if _non_finite(h)]
        if steps:
            bad.append(f"the {phase} phase's history (from step {steps[0]})")
    if bad:
        raise NonFiniteMetrics(
            f"symfast train: the run's results are not finite: {', '.join(bad)}. It diverged or a setting is "
            f"degenerate (try a smaller --lr); nothing was written to {out}.")


def _fit(model: nn.Module, *args, parallel: str, world: int, **kw):
    """:func:`fit`; under FSDP2 it trains a sharded copy and loads the gathered result back into ``model``.

    So ``model`` stays a plain module on every rank (for export, evaluation and the baselines).
    """
    if not (parallel == "fsdp" and world > 1):
        return fit(model, *args, parallel=parallel, **kw)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    work = copy.deepcopy(model)
    res = fit(work, *args, parallel=parallel, **kw)
    model.load_state_dict(get_model_state_dict(work, options=StateDictOptions(full_state_dict=True)))
    return res


def run(cfg: TrainConfig, out: str | os.PathLike, *, resume: bool = False, stop_after: Optional[int] = None,
        progress: bool = True, device=None, parallel: str = "ddp") -> Dict[str, Any]:
    """Runs ``symfast train`` with ``cfg``; writes ``out/metrics.json`` etc. and returns the metrics.

    When ``stop_after`` stops the DCS phase, only its checkpoint is written and the result is
    ``{"stopped_at": step, "steps": steps, "checkpoint": path}`` instead (``step`` counts from the run's start).

    ``parallel`` (``"ddp"`` or ``"fsdp"``) is passed to :func:`fit` for every training phase; it
    matters only when ``torch.distributed`` is initialized (``metrics["parallel"]`` is ``None`` in
    one process). Under FSDP2 each phase trains a sharded copy, and the trained model is gathered
    on every rank for export and evaluation. Without ``resume``, an earlier run's checkpoints and
    outputs in ``out`` are removed first (one line says so). With ``resume``, the settings are
    checked against the run's ``config.json`` before anything is trained (:class:`ResumeMismatch`),
    and a phase checkpoint recorded with other settings is not reused (one line says so). Progress
    notes are printed by rank 0. A non-finite result raises :class:`NonFiniteMetrics`.
    """
    t0 = time.time()
    if parallel not in PARALLEL:
        raise ValueError(f"symfast train: parallel must be one of {PARALLEL}, got {parallel!r}")
    cfg = cfg.resolved()
    out = Path(out)
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    ck = out / "checkpoints"

    def note(line: str) -> None:
        if rank == 0:
            print(line, flush=True)

    if resume and not any((ck / n).exists() for n in ("config.json", *PHASE_FILES)):
        note(f"symfast train --resume: nothing to resume in {ck} (no checkpoints); training from scratch")
    if resume and (ck / "config.json").exists():
        check_resume_config(cfg, ck)
    elif rank == 0:
        if not resume:
            removed = remove_earlier_run(out)
            if removed:
                note(f"symfast train: removed the earlier run's {', '.join(removed)} from {out} (a run without "
                     "--resume starts clean)")
        write_config(cfg, ck)
    if world > 1:
        dist.barrier()  # no rank reads the directory before rank 0 has cleaned it

    def reuse(phase: str) -> bool:
        """Whether the phase resumes from its checkpoint: only with ``resume``, and only this run's."""
        if not resume:
            return False
        why = phase_mismatch(ck / phase, cfg)
        if why is not None:
            note(f"symfast train --resume: not reusing {ck / phase}: {why}; that phase is trained from scratch")
        return why is None
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
                  progress=progress, device=device, parallel=parallel, world=world)

    def phase(name: str) -> Dict[str, Any]:
        return dict(checkpoint=ck / name, resume=reuse(name), meta=phase_meta(cfg, name))

    r_sparse = _fit(sparse, train, val, steps=cfg.steps, lr=cfg.lr, sparsity_threshold=cfg.threshold,
                    stop_after=stop_after, desc=f"DCS {cfg.structure}", **phase("dcs.pt"), **common)
    if r_sparse.stopped_early:
        return {"stopped_at": r_sparse.history[-1]["step"], "steps": cfg.steps, "checkpoint": str(ck / "dcs.pt")}
    exported = export(sparse, threshold=cfg.threshold)
    rep = sparsity_report(sparse, threshold=cfg.threshold)
    zeros = sum(r["zeros"] for r in rep.rows)
    numel = sum(r["numel"] for r in rep.rows)
    sparsity = zeros / numel
    final_n = None if cfg.eval_samples is None else 4 * cfg.eval_samples
    ev = evaluate(exported, val, device=device, max_samples=final_n)

    # ---- baseline: same budget dense, global magnitude pruning to the same zeros, 10% fine-tune with the mask
    dense.load_state_dict(init_state)
    r_dense = _fit(dense, train, val, steps=cfg.steps, lr=cfg.lr, desc="dense baseline", **phase("dense.pt"),
                   **common)
    dense_val = evaluate(dense, val, device=device, max_samples=final_n)
    trained_dense = copy.deepcopy(dense)
    prune_like(dense, converted, zeros)
    ft_steps = max(1, round(cfg.finetune_fraction * cfg.steps))
    r_ft = _fit(dense, train, val, steps=ft_steps, lr=cfg.lr / 10, warmup=0, desc="prune + fine-tune",
                **phase("finetune.pt"), **{**common, "seed": cfg.seed + 1})
    make_pruning_permanent(dense, converted)
    base_zeros = sum(int((dense.get_submodule(n).weight == 0).sum()) for n in converted)
    base = evaluate(dense, val, device=device, max_samples=final_n)

    # ---- lowrank: truncated-SVD baseline at the exported DCS ranks, fine-tuned in factorized form
    svd: Dict[str, Any] = {}
    r_svd = None
    if cfg.structure == "lowrank":
        target = {r["name"]: r["rank"] for r in rep.rows}
        svd_model = svd_truncate(trained_dense, target)
        r_svd = _fit(svd_model, train, val, steps=ft_steps, lr=cfg.lr / 10, warmup=0,
                     desc="SVD truncate + fine-tune", **phase("svd.pt"), **{**common, "seed": cfg.seed + 1})
        svd_exported = export(svd_model)
        got = {r["name"]: r["rank"] for r in sparsity_report(svd_model).rows}
        sv_ev = evaluate(svd_exported, val, device=device, max_samples=final_n)
        svd = {"svd_truncation_val_loss": sv_ev["loss"],
               "svd_truncation_val_accuracy": sv_ev.get("accuracy") if cfg.task == "digits" else None,
               "svd_truncation_val_byte_accuracy": sv_ev.get("accuracy") if cfg.task == "lm" else None,
               "svd_truncation_ranks": {n: [got[n], target[n]] for n in target},
               "svd_truncation_params_after": sum(p.numel() for p in svd_exported.parameters())}

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
        **svd,
        "dense_val_loss": dense_val["loss"],
        "dense_val_accuracy": dense_val.get("accuracy") if cfg.task == "digits" else None,
        "val_byte_accuracy": ev.get("accuracy") if cfg.task == "lm" else None,
        "inference": speed,
        "ranks": ({r["name"]: [r["rank"], r["full_rank"]] for r in rep.rows} if cfg.structure == "lowrank" else None),
        "threshold": cfg.threshold,
        "converted": converted,
        "not_converted": [n for n, *_ in report.not_converted],
        "config": config_dict(cfg),
        "finetune_steps": ft_steps,
        "data": data_info,
        "world_size": world,
        "parallel": parallel if world > 1 else None,  # one process: nothing was parallel
        "resumed_from": r_sparse.resumed_from,
        "trained_now": {k: r.steps - (r.resumed_from or 0) for k, r in
                        (("dcs", r_sparse), ("dense", r_dense), ("finetune", r_ft), ("svd_finetune", r_svd))
                        if r is not None},
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "seconds": time.time() - t0,
        "history": {"dcs": r_sparse.history, "dense": r_dense.history, "finetune": r_ft.history,
                    **({"svd_finetune": r_svd.history} if r_svd is not None else {})},
    }
    _check_finite(metrics, out)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        torch.save(exported, out / "exported.pt")
        if r_svd is not None:
            torch.save(svd_exported, out / "svd_truncation.pt")
        if svd:
            kept = sum(r for r, _ in metrics["ranks"].values()), sum(f for _, f in metrics["ranks"].values())
            versus = f"rank {kept[0]}/{kept[1]} vs SVD truncation {svd['svd_truncation_val_loss']:.3f}"
        else:
            versus = f"sparsity {sparsity:.2f} vs magnitude pruning {base['loss']:.3f}"
        title = f"{cfg.task}, {cfg.structure}, alpha={cfg.alpha:g}: DCS val {ev['loss']:.3f} at {versus}"
        plot_run(out / "training.png", r_sparse.history, r_dense.history, r_ft.history, cfg.steps, title,
              svd_hist=r_svd.history if r_svd is not None else None, ranks=metrics["ranks"])
        (out / "metrics.json").write_text(json.dumps(metrics, indent=1, allow_nan=False))
    return metrics
