r"""``symfast train``: one run = a DCS model, its export, and the baselines of the same budget.

Every arm gets the same budget, ``steps``: ``main = steps - ft`` training steps, then a fine-tune
with its mask for ``ft = round(finetune_fraction * steps)`` steps at lr / 10 (:func:`split_budget`).

1. DCS: the model is converted (:func:`symfast.convert`, every Linear/Conv/Embedding) and trained
   with :func:`fit` on ``loss + penalty`` for ``main`` steps (with ``target_sparsity``, alpha is
   steered by :class:`~symfast.train.target.SparsityTarget`); exported (:func:`symfast.export` with
   ``threshold``: ``sparsity`` is the zero fraction of the converted weights, and
   ``val_loss_before_finetune`` its loss); then fine-tuned with its zeros kept (lowrank: as rank-r
   factors). ``val_loss`` is the fine-tuned exported model's.
2. The baselines (:data:`BASELINES`, ``baselines`` chooses), each from the same initialization,
   pruned to DCS's measured sparsity: ``one_shot_magnitude`` (the dense model trained ``main`` steps,
   ``torch.nn.utils.prune.global_unstructured`` L1 to the same number of zeros), ``gradual_magnitude``
   and ``gradual_magnitude_uniform`` (GMP, Zhu & Gupta's cubic schedule, global or per-layer
   threshold, :class:`~symfast.train.baselines.GradualMagnitude`), ``gradual_magnitude_wu`` (GMP of
   ``|w * u|`` on the unpenalized elementwise DCS parametrization, alpha 0: the reparametrization
   without the lasso). Each ends with the same masked fine-tune. Learning rates: ``lr`` for DCS and
   the ``w * u`` control, ``baseline_lr`` for the plain-weight GMP arms, ``one_shot_lr`` for the
   one-shot arm's dense model (``baseline_lr`` when only that is given); with ``lr_grid`` every arm is
   trained at each lr and keeps the one with the lowest loss on the last 10% of the training data,
   held out from training in that run (:func:`tune_split`), not the reported validation set.
3. For ``structure="lowrank"`` also the truncated-SVD baseline (:func:`svd_truncate`): each converted
   weight of the trained dense model becomes its best rank-r approximation, r = the rank of the
   exported DCS layer, held as two factors; fine-tuned in that factorized form for the same ``ft``
   steps at lr / 10; ``svd_truncation_val_loss``.
4. ``DIR/metrics.json`` (``baselines``: ``{arm: {val_loss, val_accuracy, val_byte_accuracy,
   sparsity, steps, lr, lr_tune_losses}}``), ``DIR/training.png``, ``DIR/exported.pt`` (and
   ``DIR/svd_truncation.pt`` for lowrank).

Every arm's training phase uses the same ``optimizer`` (Adam or SGD with momentum; with coupled
decay for DCS), ``warmup_steps`` of linear lr warm-up (default: 5% of the phase) and, with
``clip_grad``, the loss gradient clipped to that global norm (also in the fine-tunes, which have no
warm-up). A diverged arm (NaN or inf weights, found before pruning, thresholding or evaluating) is a
:class:`NonFiniteMetrics` error naming the arm, its lr and the layer (:func:`~symfast.train.baselines.check_finite`).

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
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

from ..conversion import convert
from ..exporting import export, sparsity_report
from ..models import ByteTransformer, DigitsCNN
from .baselines import (
    Diverged,
    GradualMagnitude,
    check_finite,
    freeze_zeros,
    gmp_schedule,
    inference_speedup,
    make_pruning_permanent,
    prune_like,
    svd_truncate,
)
from .checkpoints import (
    RESUME_MAY_DIFFER,
    ResumeMismatch,
    check_resume_config,
    config_dict,
    phase_files,
    phase_meta,
    phase_mismatch,
    remove_earlier_run,
    write_config,
)
from .data import digits_data, lm_data
from .loop import OPTIMIZERS, dcs_sparsity, evaluate, fit, make_optimizer
from .plots import plot_run
from .target import SparsityTarget

__all__ = ["TrainConfig", "run", "BASELINES", "split_budget", "tune_split", "prune_like", "svd_truncate", "inference_speedup", "check_resume_config",
           "RESUME_MAY_DIFFER", "ResumeMismatch", "NonFiniteMetrics"]

TASKS = ("lm", "digits")
PARALLEL = ("ddp", "fsdp")
#: Attention heads of the lm task's transformer: ``width`` must be divisible by it.
LM_HEADS = 4
#: Settings that only the lm task has (digits has no blocks, context or embedding).
LM_ONLY = ("depth", "context", "embedding_lr_scale")
#: The baselines of every run (``--baselines`` chooses a subset): one-shot global magnitude pruning of the
#: trained dense model; gradual magnitude pruning (GMP) with a global threshold, with a per-layer-uniform
#: one, and on the unpenalized ``theta = w * u`` (the control that separates the reparametrization from
#: the penalty). Each ends with the same masked fine-tune as DCS.
BASELINES = ("one_shot_magnitude", "gradual_magnitude", "gradual_magnitude_uniform", "gradual_magnitude_wu")
#: The baselines that mask during training (``fit(after_step=...)``), which FSDP2's sharded copy does not run.
MASK_IN_TRAINING = BASELINES[1:]


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
    baseline_lr: Optional[float] = None
    one_shot_lr: Optional[float] = None
    baselines: Optional[List[str]] = None
    lr_grid: Optional[List[float]] = None
    target_sparsity: Optional[float] = None
    clip_grad: Optional[float] = None
    warmup_steps: Optional[int] = None
    embedding_lr_scale: Optional[float] = None

    def resolved(self) -> "TrainConfig":
        d = defaults(self.task, self.structure, quick=self.quick)
        if self.task != "lm":
            given = [k for k in LM_ONLY if getattr(self, k) is not None]
            if given:
                raise ValueError(f"symfast train: {' and '.join(given)} apply only to task 'lm', not {self.task!r}")
        out = copy.copy(self)
        if out.one_shot_lr is None and out.baseline_lr is not None:
            out.one_shot_lr = out.baseline_lr  # --baseline-lr alone sets every plain-weight arm, as it reads
        for k, v in d.items():
            if getattr(out, k) is None:
                setattr(out, k, v)
        out.baselines = list(BASELINES) if out.baselines is None else list(out.baselines)
        unknown = [b for b in out.baselines if b not in BASELINES]
        if unknown or len(set(out.baselines)) != len(out.baselines):
            raise ValueError(f"symfast train: baselines must be distinct names from {BASELINES}, got {out.baselines}")
        if out.lr_grid is not None:
            out.lr_grid = [float(x) for x in out.lr_grid]
            if not out.lr_grid or not all(math.isfinite(x) and x > 0 for x in out.lr_grid):
                raise ValueError(f"symfast train: lr_grid must be finite numbers > 0, got {out.lr_grid}")
        if out.target_sparsity is not None and not 0 < out.target_sparsity < 1:
            raise ValueError(f"symfast train: target_sparsity must be in (0, 1), got {out.target_sparsity}")
        if out.target_sparsity is not None and out.alpha == 0:
            raise ValueError("symfast train: target_sparsity needs a starting alpha > 0 (the controller scales it)")
        if out.steps < 2:
            raise ValueError(f"symfast train: steps must be >= 2 (training and the masked fine-tune), got {out.steps}")
        if out.optimizer not in OPTIMIZERS:
            raise ValueError(f"symfast train: optimizer must be one of {OPTIMIZERS}, got {out.optimizer!r}")
        if out.clip_grad is not None and not (math.isfinite(out.clip_grad) and out.clip_grad > 0):
            raise ValueError(f"symfast train: clip_grad must be a finite number > 0, got {out.clip_grad}")
        if out.embedding_lr_scale is not None and not (math.isfinite(out.embedding_lr_scale)
                                                       and out.embedding_lr_scale > 0):
            raise ValueError(f"symfast train: embedding_lr_scale must be a finite number > 0, got {out.embedding_lr_scale}")
        main = split_budget(out.steps, out.finetune_fraction)[1]
        if out.warmup_steps is not None and not 0 <= out.warmup_steps <= main:
            raise ValueError(f"symfast train: warmup_steps must be in [0, {main}] (the training phase of "
                             f"{out.steps} steps less the fine-tune), got {out.warmup_steps}")
        return out


def defaults(task: str, structure: str, *, quick: bool) -> Dict[str, Any]:
    """The task's default settings (the values chosen so that ``--quick`` reaches sparsity >= 0.5 in about a minute).

    Learning rates are per arm: on ``theta = w * u`` Adam's step moves theta by about ``lr * |w|``, so
    DCS (and the ``w * u`` control) needs a larger lr than plain weights. lm: DCS 2e-2, plain-weight
    baselines 1e-2, each the best of the grid {3e-3, 1e-2, 2e-2} in a 3-seed study at the default
    budget. digits: each arm's best mean validation accuracy over seeds 0-4 at the quick budget, on the
    grid {3e-3, 5e-3, 1e-2, 2e-2, 3e-2, 5e-2}, at the sparsity these defaults reach (0.96) and at 0.9:
    DCS and the ``w * u`` control 3e-2, global and per-layer GMP 2e-2, one-shot 5e-3 (at 2e-2 its dense
    model prunes worse: 47% against 64% accuracy at 0.96). So no baseline is handicapped by sharing
    DCS's lr or another arm's (``--lr-grid`` tunes any run).
    """
    if task not in TASKS:
        raise ValueError(f"symfast train: task must be one of {TASKS}, got {task!r}")
    if task == "lm":
        d = dict(width=128, depth=2, context=64, steps=1500, batch_size=32, lr=2e-2, baseline_lr=1e-2, one_shot_lr=1e-2, alpha=3e-4, threshold=1e-2,
                 eval_samples=1024)
        if quick:
            d.update(width=64, depth=2, context=32, steps=200, eval_samples=256)
    else:
        d = dict(width=16, depth=None, context=None, steps=600, batch_size=64, lr=3e-2, baseline_lr=2e-2, one_shot_lr=5e-3, alpha=3e-4, threshold=1e-2,
                 eval_samples=None)
        if quick:
            d.update(steps=300)
    return d


def split_budget(steps: int, finetune_fraction: float) -> Tuple[int, int]:
    """``(fine-tune steps, main steps)`` of a budget of ``steps``: every arm trains ``main`` steps, then fine-tunes
    with its mask for ``round(finetune_fraction * steps)`` (at least 1, leaving at least 1 main step)."""
    ft = min(steps - 1, max(1, round(finetune_fraction * steps)))
    return ft, steps - ft


def tune_split(train, *, gap: int = 0):
    """``(train, tune)``: the last 10% of ``train`` held out to choose learning rates, and the rest minus ``gap``
    items before it (the lm task's windows overlap their ``context`` neighbours)."""
    from torch.utils.data import Subset

    n = len(train)
    k = max(1, n // 10)
    if n - k - gap < 1:
        raise ValueError(f"symfast train: too little training data ({n} items) to hold out a tuning split")
    return Subset(train, range(n - k - gap)), Subset(train, range(n - k, n))


def zero_holding(model: nn.Module) -> List[str]:
    """The modules of ``model`` whose ``weight`` has exact zeros (what a masked fine-tune must keep)."""
    return [n for n, m in model.named_modules()
            if isinstance(getattr(m, "weight", None), torch.Tensor) and bool((m.weight == 0).any())]


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


def _non_finite(x: Any, path: str) -> List[str]:
    """``"path value"`` of every nan or inf float in ``x`` (nested dicts and lists by ``.key`` / ``[i]``)."""
    if isinstance(x, float):
        return [] if math.isfinite(x) else [f"{path} {x}"]
    if isinstance(x, dict):
        return [b for k, v in x.items() for b in _non_finite(v, f"{path}.{k}")]
    if isinstance(x, (list, tuple)):
        return [b for i, v in enumerate(x) for b in _non_finite(v, f"{path}[{i}]")]
    return []


def _check_finite(metrics: Dict[str, Any], out: Path) -> None:
    """:class:`NonFiniteMetrics` naming every result that is nan or inf (JSON has no such numbers)."""
    bad = [b for k, v in metrics.items() if k != "history" for b in _non_finite(v, k)]
    for phase, hist in metrics["history"].items():
        steps = [h["step"] for h in hist if _non_finite(h, "")]
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

    if world > 1 and parallel == "fsdp":
        masked = [b for b in cfg.baselines if b in MASK_IN_TRAINING]
        if masked or cfg.target_sparsity is not None:
            raise ValueError("symfast train: under FSDP2 the baselines " + ", ".join(masked or ["-"]) + " and "
                             "target_sparsity cannot run (they act on the weights between steps, which FSDP2 "
                             "shards); choose baselines=['one_shot_magnitude'] or parallel='ddp'")
    if resume and not ((ck / "config.json").exists() or phase_files(ck)):
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
    tune = None
    if cfg.lr_grid:
        train, tune = tune_split(train, gap=cfg.context or 0)
        data_info = {**data_info, "lr_selection": f"each arm's lr from {cfg.lr_grid} by its final loss on the "
                     f"last {len(tune)} train items, held out from training (the reported val set is separate)"}
    dense = dense.to(device)
    init_state = copy.deepcopy(dense.state_dict())
    params_before = sum(p.numel() for p in dense.parameters())
    ft_steps, main_steps = split_budget(cfg.steps, cfg.finetune_fraction)
    final_n = None if cfg.eval_samples is None else 4 * cfg.eval_samples
    common = dict(batch_size=cfg.batch_size, seed=cfg.seed, eval_every=cfg.eval_every, warmup=cfg.warmup_steps,
                  clip_grad=cfg.clip_grad, embedding_lr_scale=cfg.embedding_lr_scale, eval_samples=cfg.eval_samples, progress=progress, device=device,
                  parallel=parallel, world=world)
    ft_common = {**common, "seed": cfg.seed + 1, "optimizer": cfg.optimizer, "warmup": 0}

    def phase(name: str, lr: float, lrs) -> Dict[str, Any]:
        file = f"{name}.pt" if len(lrs) == 1 else f"{name}-lr{lr:g}.pt"
        return dict(checkpoint=ck / file, resume=reuse(file), meta=phase_meta(cfg, file))

    def fresh_dense() -> nn.Module:
        m = copy.deepcopy(dense)
        m.load_state_dict(init_state)
        return m

    def finetune(model: nn.Module, names, lr: float, name: str, lrs):
        """The masked fine-tune every arm ends with: its zeros kept, ``ft_steps`` steps at lr / 10."""
        freeze_zeros(model, names)
        r = _fit(model, train, val, steps=ft_steps, lr=lr / 10, desc=f"{name} fine-tune",
                 **phase(f"{name}_finetune" if name != "one_shot_magnitude" else "finetune", lr, lrs), **ft_common)
        make_pruning_permanent(model, names)
        return r

    def score(model: nn.Module) -> Optional[float]:
        return None if tune is None else evaluate(model, tune, device=device, max_samples=final_n)["loss"]

    # ---- DCS: loss + penalty for the main part of the budget, export (threshold), masked fine-tune
    def dcs_arm(lr: float, lrs, stop: Optional[int]):
        model = convert(fresh_dense(), structure=cfg.structure, alpha=cfg.alpha, warn=False)
        opt, ctl = cfg.optimizer, None
        if cfg.target_sparsity is not None:
            opt = make_optimizer(model, cfg.optimizer, lr, embedding_lr_scale=cfg.embedding_lr_scale)
            ctl = SparsityTarget(model, opt, target=cfg.target_sparsity, steps=main_steps, threshold=cfg.threshold)
        # with the controller the optimizer is built here, and its groups already carry the embedding scale
        r = _fit(model, train, val, steps=main_steps, lr=lr, sparsity_threshold=cfg.threshold, stop_after=stop,
                 desc=f"DCS {cfg.structure}", optimizer=opt, after_step=ctl, **phase("dcs", lr, lrs),
                 **{**common, **({"embedding_lr_scale": None} if ctl is not None else {})})
        if r.stopped_early:
            return {"stopped_at": r.history[-1]["step"]}
        check_finite("train", model)
        exported = export(model, threshold=cfg.threshold)
        before = evaluate(exported, val, device=device, max_samples=final_n)
        if cfg.structure == "lowrank":
            # Keeps each layer's rank: thin pairs stay thin, and a layer exported whole (thin would not be
            # smaller) is fine-tuned as its two rank-r factors, as the SVD baseline is.
            whole = {r["name"]: r["rank"] for r in sparsity_report(model, threshold=cfg.threshold).rows
                     if not isinstance(exported.get_submodule(r["name"]), nn.Sequential)}
            exported = svd_truncate(exported, whole)
            r_ft = _fit(exported, train, val, steps=ft_steps, lr=lr / 10, desc="dcs fine-tune",
                        **phase("dcs_finetune", lr, lrs), **ft_common)
            exported = export(exported)
        else:
            r_ft = finetune(exported, zero_holding(exported), lr, "dcs", lrs)
        return dict(model=model, final=exported, runs=(r, r_ft), before=before,
                    alpha=ctl.alpha if ctl is not None else cfg.alpha, history={"dcs": r.history,
                                                                                 "dcs_finetune": r_ft.history})

    def diverged(arm: str, lr: float, exc: Diverged) -> NonFiniteMetrics:
        return NonFiniteMetrics(f"symfast train: the {arm} arm (lr {lr:g}) diverged: {exc}. Nothing was written to "
                                f"{out}; try a smaller learning rate, --clip-grad or --warmup-steps")

    lr_dcs = cfg.lr_grid or [cfg.lr]
    dcs_runs = []
    for i, lr in enumerate(lr_dcs):
        try:
            res = dcs_arm(lr, lr_dcs, stop_after if i == 0 else None)
            if "final" in res:
                check_finite("train", res["final"])  # the fine-tune
        except Diverged as exc:
            raise diverged("DCS", lr, exc) from None
        if "stopped_at" in res:
            return {"stopped_at": res["stopped_at"], "steps": cfg.steps,
                    "checkpoint": str(phase("dcs", lr, lr_dcs)["checkpoint"])}
        dcs_runs.append((score(res["final"]), lr, res))
    dcs_tune, dcs_lr, best = min(dcs_runs, key=lambda t: (t[0] if t[0] is not None else 0.0))
    sparse, exported = best["model"], best["final"]
    report = sparse.dcs_report
    converted = [n for n, _, _ in report.converted]
    rep = sparsity_report(sparse, threshold=cfg.threshold)
    zeros = sum(r["zeros"] for r in rep.rows)
    numel = sum(r["numel"] for r in rep.rows)
    sparsity = zeros / numel
    ev = evaluate(exported, val, device=device, max_samples=final_n)

    def weight_sparsity(model: nn.Module) -> float:
        """The zero fraction of the converted layers' weights (``model`` plain, as the DCS export is counted)."""
        return sum(int((model.get_submodule(n).weight == 0).sum()) for n in converted) / numel

    # ---- the baselines, each from the same initialization, with the same total steps, at DCS's sparsity
    trained_dense: Dict[float, nn.Module] = {}

    def dense_phase(lr: float, lrs):
        model = fresh_dense()
        r = _fit(model, train, val, steps=main_steps, lr=lr, desc="dense", optimizer=cfg.optimizer,
                 **phase("dense", lr, lrs), **common)
        trained_dense[lr] = (copy.deepcopy(model), r)
        return model, r

    def baseline_arm(arm: str, lr: float, lrs):
        if arm == "one_shot_magnitude":
            model, r = dense_phase(lr, lrs)
            prune_like(model, converted, zeros)
            make_pruning_permanent(model, converted)  # the fine-tune masks the same zeros again
        else:
            wu = arm == "gradual_magnitude_wu"
            model = fresh_dense()
            if wu:
                model = convert(model, structure="elementwise", alpha=0.0, include=lambda n, m: n in converted,
                                warn=False)
            gmp = GradualMagnitude(model, converted, final=sparsity, uniform=arm == "gradual_magnitude_uniform",
                                   **gmp_schedule(main_steps))
            r = _fit(model, train, val, steps=main_steps, lr=lr, desc=arm, optimizer=cfg.optimizer,
                     after_step=gmp, **phase(arm, lr, lrs), **common)
            if wu:  # fine-tuned as w * u too; theta is exactly 0 where masked (export could drop dead units)
                r_ft = _fit(model, train, val, steps=ft_steps, lr=lr / 10, desc=f"{arm} fine-tune",
                            after_step=GradualMagnitude.keep_zeros(model, converted),
                            **phase(f"{arm}_finetune", lr, lrs), **ft_common)
                return dict(final=model, sparsity=dcs_sparsity(model), runs=(r, r_ft),
                            history={arm: r.history, f"{arm}_finetune": r_ft.history})
        r_ft = finetune(model, converted, lr, arm, lrs)
        return dict(final=model, sparsity=weight_sparsity(model), runs=(r, r_ft),
                    history={arm: r.history, f"{arm}_finetune": r_ft.history})

    baselines: Dict[str, Any] = {}
    histories: Dict[str, Any] = dict(best["history"])
    runs = {"dcs": best["runs"][0], "dcs_finetune": best["runs"][1]}
    for arm in cfg.baselines:
        own = {"gradual_magnitude_wu": cfg.lr, "one_shot_magnitude": cfg.one_shot_lr}
        lrs = cfg.lr_grid or [own.get(arm, cfg.baseline_lr)]
        tried = []
        for lr in lrs:
            try:
                res = baseline_arm(arm, lr, lrs)
                check_finite("train", res["final"])
            except Diverged as exc:
                raise diverged(arm, lr, exc) from None
            tried.append((res, lr))
        scored = [(score(res["final"]), lr, res) for res, lr in tried]
        tune_loss, lr, res = min(scored, key=lambda t: (t[0] if t[0] is not None else 0.0))
        b_ev = evaluate(res["final"], val, device=device, max_samples=final_n)
        baselines[arm] = {"val_loss": b_ev["loss"],
                          "val_accuracy": b_ev.get("accuracy") if cfg.task == "digits" else None,
                          "val_byte_accuracy": b_ev.get("accuracy") if cfg.task == "lm" else None,
                          "sparsity": res["sparsity"], "steps": main_steps + ft_steps, "lr": lr,
                          "lr_tune_losses": None if tune is None else {f"{l:g}": t for t, l, _ in scored}}
        histories.update(res["history"])
        runs[arm], runs[f"{arm}_finetune"] = res["runs"]
    dense_val = None
    if "one_shot_magnitude" in baselines:
        dense_model = trained_dense[baselines["one_shot_magnitude"]["lr"]][0]
        dense_val = evaluate(dense_model, val, device=device, max_samples=final_n)

    # ---- lowrank: truncated-SVD baseline at the exported DCS ranks, fine-tuned in factorized form
    svd: Dict[str, Any] = {}
    r_svd = None
    if cfg.structure == "lowrank":
        target = {r["name"]: r["rank"] for r in rep.rows}
        svd_lr = baselines["one_shot_magnitude"]["lr"] if "one_shot_magnitude" in baselines else cfg.one_shot_lr
        if svd_lr not in trained_dense:  # the SVD baseline truncates a trained dense model
            dense_phase(svd_lr, [svd_lr])
            runs["dense"] = trained_dense[svd_lr][1]
            histories["dense"] = runs["dense"].history
        svd_dense = trained_dense[svd_lr][0]
        if dense_val is None:
            dense_val = evaluate(svd_dense, val, device=device, max_samples=final_n)
        try:
            svd_model = svd_truncate(svd_dense, target)
        except Diverged as exc:
            raise diverged("dense (the SVD baseline's start)", svd_lr, exc) from None
        r_svd = _fit(svd_model, train, val, steps=ft_steps, lr=svd_lr / 10, desc="SVD truncate + fine-tune",
                     **phase("svd", svd_lr, [svd_lr]), **ft_common)
        svd_exported = export(svd_model)
        got = {r["name"]: r["rank"] for r in sparsity_report(svd_model).rows}
        sv_ev = evaluate(svd_exported, val, device=device, max_samples=final_n)
        svd = {"svd_truncation_val_loss": sv_ev["loss"],
               "svd_truncation_val_accuracy": sv_ev.get("accuracy") if cfg.task == "digits" else None,
               "svd_truncation_val_byte_accuracy": sv_ev.get("accuracy") if cfg.task == "lm" else None,
               "svd_truncation_ranks": {n: [got[n], target[n]] for n in target},
               "svd_truncation_params_after": sum(p.numel() for p in svd_exported.parameters())}
        runs["svd_finetune"] = r_svd
        histories["svd_finetune"] = r_svd.history

    speed = None
    if cfg.structure == "group":
        x = torch.stack([val[i][0] for i in range(min(len(val), 64))]).to(device)
        reference = trained_dense[next(iter(trained_dense))][0] if trained_dense else fresh_dense()
        speed = inference_speedup(reference, exported, x)

    metrics: Dict[str, Any] = {
        "task": cfg.task,
        "structure": cfg.structure,
        "alpha": cfg.alpha,
        "alpha_final": best["alpha"],
        "target_sparsity": cfg.target_sparsity,
        "steps": cfg.steps,
        "lr": dcs_lr,
        "lr_tune_losses": None if tune is None else {f"{lr:g}": t for t, lr, _ in dcs_runs},
        "sparsity": sparsity,
        "val_loss": ev["loss"],
        "val_accuracy": ev.get("accuracy") if cfg.task == "digits" else None,
        "val_loss_before_finetune": best["before"]["loss"],
        "params_before": params_before,
        "params_after": sum(p.numel() for p in exported.parameters()),
        "nonzero_params_after": int(sum(int((p != 0).sum()) for p in exported.parameters())),
        "baselines": baselines,
        **svd,
        "dense_val_loss": None if dense_val is None else dense_val["loss"],
        "dense_val_accuracy": dense_val.get("accuracy") if dense_val is not None and cfg.task == "digits" else None,
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
        "resumed_from": best["runs"][0].resumed_from,
        "trained_now": {k: r.steps - (r.resumed_from or 0) for k, r in runs.items()},
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "seconds": time.time() - t0,
        "history": histories,
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
            best_base = min(baselines.items(), key=lambda kv: kv[1]["val_loss"], default=None)
            versus = f"sparsity {sparsity:.2f}" + ("" if best_base is None else
                                                  f" vs {best_base[0]} {best_base[1]['val_loss']:.3f}")
        title = f"{cfg.task}, {cfg.structure}, alpha={best['alpha']:.3g}: DCS val {ev['loss']:.3f} at {versus}"
        plot_run(out / "training.png", histories, main_steps, title, ranks=metrics["ranks"])
        (out / "metrics.json").write_text(json.dumps(metrics, indent=1, allow_nan=False))
    return metrics
