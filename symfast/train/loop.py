r"""A small, exact training loop: :func:`fit` trains any ``nn.Module`` on any map-style dataset.

Why a home-made loop rather than ``DataLoader(shuffle=True)``: the batch of step ``k`` is drawn by a
generator seeded with ``(seed, k)``, so it depends on nothing but the seed and the step. A run that
is stopped, checkpointed and resumed therefore sees exactly the batches of an uninterrupted run, and
``N`` data-parallel processes split exactly the global batch a single process would use (rank ``r``
takes the ``r``-th contiguous slice). The learning rate is a pure function of the step too (linear
warm-up, then cosine decay), so resuming needs only the model, optimizer and RNG states.

DCS models (from :func:`symfast.convert`) are trained with :func:`symfast.param_groups`:
coupled weight decay ``2 alpha`` on the factors, which is exactly ``loss + penalty(model)`` for
SGD and Adam (not AdamW, see ``param_groups``).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset, default_collate

from ..conversion import param_groups
from ..nn.layers import DCSLayer

__all__ = ["fit", "evaluate", "dcs_sparsity", "FitResult", "Interrupted", "cross_entropy", "lr_at"]

OPTIMIZERS = ("adam", "sgd")


def cross_entropy(output: Tensor, target: Tensor) -> Tensor:
    """Mean cross-entropy over every position: ``output (..., C)`` logits, ``target (...)`` class indices."""
    return F.cross_entropy(output.reshape(-1, output.shape[-1]), target.reshape(-1))


def lr_at(step: int, *, lr: float, steps: int, warmup: int, final_fraction: float = 0.0) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay from ``lr`` to ``final_fraction * lr`` at ``steps``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return lr * (final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


@torch.no_grad()
def dcs_sparsity(model: nn.Module, *, threshold: float = 0.0) -> Optional[float]:
    """Zero fraction of the DCS layers' weights theta after ``threshold`` (as :func:`symfast.export` zeroes them).

    ``None`` for a model without DCS layers.
    """
    zeros = total = 0
    for m in model.modules():
        if isinstance(m, DCSLayer):
            theta = m.parametrization.thresholded(threshold)
            if hasattr(theta, "full_tensor"):  # FSDP2 shard
                theta = theta.full_tensor()
            zeros += int((theta == 0).sum())
            total += theta.numel()
    return zeros / total if total else None


def _batch(data: Dataset, idx: Tensor, device) -> List[Tensor]:
    items = default_collate([data[int(i)] for i in idx])
    if isinstance(items, Tensor):
        items = [items]
    return [t.to(device) for t in items]


@torch.no_grad()
def evaluate(model: nn.Module, data: Dataset, *, loss_fn: Callable = cross_entropy, batch_size: int = 64,
             max_samples: Optional[int] = 2048, device=None) -> Dict[str, float]:
    """Mean loss (and top-1 accuracy when the target holds class indices) on ``max_samples`` evenly spaced items.

    The items are fixed (``linspace`` over the dataset), so every evaluation of a run, and of its
    baseline, sees the same validation set. The model is put in eval mode and restored after.
    """
    device = device or next(model.parameters()).device
    n = len(data) if max_samples is None else min(len(data), max_samples)
    idx = torch.linspace(0, len(data) - 1, n).round().long()
    was = model.training
    model.eval()
    loss_sum, correct, count, positions = 0.0, 0, 0, 0
    try:
        for s in range(0, n, batch_size):
            x, y = _batch(data, idx[s: s + batch_size], device)[:2]
            out = model(x)
            loss_sum += float(loss_fn(out, y)) * len(x)
            count += len(x)
            if not y.is_floating_point() and out.shape[:-1] == y.shape:
                correct += int((out.argmax(-1) == y).sum())
                positions += y.numel()
    finally:
        model.train(was)
    res = {"loss": loss_sum / count}
    if positions:
        res["accuracy"] = correct / positions
    return res


@dataclass
class FitResult:
    """What :func:`fit` did. ``history``: one dict per logged step (``step``, ``loss``, ``lr``, and at
    validation steps ``val_loss``, ``val_accuracy``, ``sparsity``); ``val``: the final validation."""

    steps: int
    history: List[Dict[str, Any]] = field(default_factory=list)
    val: Dict[str, float] = field(default_factory=dict)
    resumed_from: Optional[int] = None
    stopped_early: bool = False


class Interrupted(KeyboardInterrupt):
    """A ``KeyboardInterrupt`` (Ctrl-C) during :func:`fit`, with where it happened.

    ``desc``: the ``desc`` of the interrupted :func:`fit`; ``step``: the steps completed of ``steps``;
    ``checkpoint``: its checkpoint file (``None`` without one); ``checkpoint_step``: the step that file
    holds (``None`` when nothing was written or resumed yet), where ``resume=True`` continues.
    """

    def __init__(self, desc: str, step: int, steps: int, checkpoint: Optional[Path],
                 checkpoint_step: Optional[int]) -> None:
        super().__init__(f"{desc}: interrupted after step {step} of {steps}")
        self.desc, self.step, self.steps = desc, step, steps
        self.checkpoint, self.checkpoint_step = checkpoint, checkpoint_step


def _dist() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def make_optimizer(model: nn.Module, name: str, lr: float, *, weight_decay: float = 0.0,
                   embedding_lr_scale: Optional[float] = None) -> torch.optim.Optimizer:
    """Adam or SGD (momentum 0.9) over :func:`symfast.param_groups` (the DCS penalty as coupled decay).

    ``embedding_lr_scale`` multiplies the lr of the parameters of every ``nn.Embedding`` (DCS twins and
    tied weights included) through groups of their own with the same decay, so :func:`fit`'s schedule
    keeps the ratio. Why: embeddings start at N(0, 1), an order of magnitude above a Linear's weights,
    so the same Adam step moves them relatively less (on ``theta = w * u`` about ``lr / sqrt|theta|``,
    on a plain weight ``lr / |theta|``).
    """
    groups = param_groups(model, weight_decay=weight_decay)
    if embedding_lr_scale is not None:
        if not (isinstance(embedding_lr_scale, (int, float)) and math.isfinite(embedding_lr_scale)
                and embedding_lr_scale > 0):
            raise ValueError("symfast.train.fit: embedding_lr_scale must be None or a finite number > 0, "
                             f"got {embedding_lr_scale!r}")
        emb = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
        if not emb:
            raise ValueError("symfast.train.fit: embedding_lr_scale was given, but the model has no nn.Embedding")
        split = []
        for g in groups:
            rest = {k: v for k, v in g.items() if k != "params"}
            scaled = [p for p in g["params"] if id(p) in emb]
            plain = [p for p in g["params"] if id(p) not in emb]
            split += [{**rest, "params": plain}] if plain else []
            split += [{**rest, "params": scaled, "lr": lr * embedding_lr_scale}] if scaled else []
        groups = split
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9)
    raise ValueError(f"symfast.train.fit: optimizer must be one of {OPTIMIZERS}, got {name!r} "
                     "(AdamW's decoupled decay does not minimize loss + penalty; see symfast.param_groups)")


def _optimizer_names(model: nn.Module, opt: torch.optim.Optimizer) -> List[str]:
    """The qualified names of ``opt``'s parameters in the order of ``opt.state_dict()``'s indices."""
    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    try:
        return [names[id(p)] for g in opt.param_groups for p in g["params"]]
    except KeyError:
        raise ValueError("symfast.train.fit: the argument optimizer holds parameters that are not the model's") \
            from None


def _full_states(model: nn.Module, opt: torch.optim.Optimizer, sharded: bool, rank: int):
    """``(model.state_dict(), opt.state_dict())`` as one process holds them; gathered (on CPU) under FSDP2.

    Under FSDP2 every rank must call this (it all-gathers); only rank 0's result is complete. The
    optimizer state, which torch's full state dict keys by parameter name, is keyed back by index
    so that the checkpoint is the one a single process writes.
    """
    if not sharded:
        return model.state_dict(), opt.state_dict()
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(model, options=options)
    by_name = get_optimizer_state_dict(model, opt, options=options)
    if rank != 0:
        return None, None
    index = {n: i for i, n in enumerate(_optimizer_names(model, opt))}
    opt_state = {"state": {index[n]: v for n, v in by_name["state"].items()},
                 "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in by_name["param_groups"]]}
    return model_state, opt_state


def _load_states(model: nn.Module, opt: torch.optim.Optimizer, model_state, opt_state, sharded: bool) -> None:
    """Loads a checkpoint's (single-process format) states; under FSDP2 each rank keeps its shards."""
    if not sharded:
        model.load_state_dict(model_state)
        opt.load_state_dict(opt_state)
        return
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    names = _optimizer_names(model, opt)
    if len(names) != sum(len(g["params"]) for g in opt_state["param_groups"]):
        raise ValueError("symfast.train.fit: the checkpoint's optimizer has a different number of parameters "
                         f"than the model's ({len(names)})")
    by_name = {"state": {names[i]: v for i, v in opt_state["state"].items()},
               "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in opt_state["param_groups"]]}
    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, model_state, options=options)
    set_optimizer_state_dict(model, opt, by_name, options=options)


def fit(
    model: nn.Module,
    train_data: Dataset,
    val_data: Optional[Dataset] = None,
    *,
    steps: int,
    batch_size: int = 32,
    lr: float = 1e-3,
    optimizer: str | torch.optim.Optimizer = "adam",
    loss_fn: Callable[[Tensor, Tensor], Tensor] = cross_entropy,
    warmup: Optional[int] = None,
    final_lr_fraction: float = 0.0,
    seed: int = 0,
    eval_every: Optional[int] = None,
    eval_samples: Optional[int] = 2048,
    sparsity_threshold: float = 0.0,
    checkpoint: Optional[str | os.PathLike] = None,
    checkpoint_every: Optional[int] = None,
    resume: bool = False,
    stop_after: Optional[int] = None,
    progress: bool = True,
    desc: str = "train",
    device=None,
    parallel: str = "ddp",
    meta: Any = None,
    after_step: Optional[Callable[[int], None]] = None,
    clip_grad: Optional[float] = None,
    embedding_lr_scale: Optional[float] = None,
) -> FitResult:
    r"""Trains ``model`` for ``steps`` steps on ``train_data``; returns a :class:`FitResult`.

    Works with one's own module and dataset: ``train_data[i]`` must return ``(input, target)``
    (tensors, collated with ``default_collate``) and ``loss_fn(model(input), target)`` a scalar.
    A model converted by :func:`symfast.convert` is trained on ``loss + penalty(model)``, through the
    optimizer's coupled weight decay (:func:`symfast.param_groups`); a plain model without decay.

    Step ``k`` uses the items ``randint(len(train_data), (batch_size,))`` of a generator seeded with
    ``seed * 1_000_003 + k`` and the learning rate :func:`lr_at` (warm-up ``warmup`` steps, default
    5%, then cosine decay to ``final_lr_fraction * lr``).

    Distributed: when ``torch.distributed`` is initialized (e.g. under ``torchrun``), the model is
    wrapped in ``DistributedDataParallel`` and rank ``r`` of ``W`` takes the ``r``-th slice of each
    global batch of ``batch_size`` items (``batch_size`` must be divisible by ``W``). Gradients are
    averaged, so training matches one process with the same global batch up to float rounding.

    Checkpoints: with ``checkpoint`` (a file), the model, optimizer and RNG states and the history
    are saved every ``checkpoint_every`` steps (default: at each validation) and at the end (rank 0
    writes). ``resume=True`` continues from it when it exists, to the same result as an
    uninterrupted run. ``stop_after=k`` stops after step ``k`` (checkpointed), as an interruption would;
    resumed past step ``k``, it stops (checkpointed) after the next step.

    The checkpoint also records ``steps``, ``batch_size``, ``lr``, ``warmup``, ``final_lr_fraction``,
    ``seed``, ``clip_grad``, ``embedding_lr_scale`` and the optimizer's name; resuming with any of them different is a ``ValueError`` (the
    world size may differ). ``meta`` (anything picklable, e.g. the settings of the whole experiment)
    is saved with it as ``"meta"``, for the caller to check before resuming; ``fit`` does not read it.

    ``clip_grad``, when given, scales the gradient of the loss to a global L2 norm of at most
    ``clip_grad`` before each optimizer step (``torch.nn.utils.clip_grad_norm_``). The coupled decay
    of a DCS model (the penalty's gradient) is added by the optimizer after it and is not clipped: it
    is bounded by the weights already. It makes plain SGD robust to the rare huge gradients that can
    blow a run up; with DDP it clips the averaged gradient, with FSDP2 the full one.

    ``embedding_lr_scale``, when given, multiplies the lr of every ``nn.Embedding``'s parameters (see
    :func:`make_optimizer`); the optimizer must then be given by name.

    ``after_step(k)``, when given, is called after the optimizer step that completes step ``k`` (before
    that step's validation and checkpoint), e.g. to apply pruning masks or to adapt a penalty. It
    must keep no state that the model's weights (or the optimizer's param groups) do not hold, or
    resuming would lose it; if it has a ``resumed(k)`` method, a resume at step ``k`` calls it once the
    checkpoint is loaded, before the next optimizer step, to read that state back from the weights.

    Ctrl-C during training raises :class:`Interrupted` (a ``KeyboardInterrupt``) saying after which
    step it stopped and which step the checkpoint holds.

    ``parallel="fsdp"`` shards the model with FSDP2 (``torch.distributed.fsdp.fully_shard``, one
    group for the whole model) instead of DDP, for models that do not fit one device; the optimizer
    is built on the sharded parameters, so ``optimizer`` must be given by name (an optimizer object
    is a ``ValueError``). The model stays sharded after ``fit``: gather it with
    ``torch.distributed.checkpoint.state_dict.get_model_state_dict(model, options=StateDictOptions(
    full_state_dict=True))``. Checkpoints under FSDP2 gather the full model and optimizer states
    (``get_model_state_dict`` / ``get_optimizer_state_dict`` with ``StateDictOptions(
    full_state_dict=True, cpu_offload=True)``, on CPU) and rank 0 writes them in the same format
    as a single process (``model.state_dict()``, ``optimizer.state_dict()`` keyed by parameter
    index), so one checkpoint resumes under any world size, DDP, FSDP2 or a single process; resuming
    under FSDP2 reads it on every rank (on CPU) and shards it with ``set_model_state_dict`` /
    ``set_optimizer_state_dict``. The full state must fit in each rank's CPU memory.
    """
    rank, world = _dist()
    if steps < 1:
        raise ValueError(f"symfast.train.fit: steps must be >= 1, got {steps}")
    if clip_grad is not None and not (isinstance(clip_grad, (int, float)) and math.isfinite(clip_grad)
                                      and clip_grad > 0):
        raise ValueError(f"symfast.train.fit: clip_grad must be None or a finite number > 0, got {clip_grad!r}")
    if warmup is not None and (isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0):
        raise ValueError(f"symfast.train.fit: warmup must be None or an integer >= 0, got {warmup!r}")
    if batch_size % world:
        raise ValueError(f"symfast.train.fit: batch_size ({batch_size}) must be divisible by the world size ({world})")
    device = device or next(model.parameters()).device
    warmup = max(1, steps // 20) if warmup is None else warmup
    eval_every = eval_every or max(1, steps // 10)
    checkpoint_every = checkpoint_every or eval_every
    if parallel not in ("ddp", "fsdp"):
        raise ValueError(f"symfast.train.fit: parallel must be 'ddp' or 'fsdp', got {parallel!r}")
    if parallel == "fsdp" and isinstance(optimizer, torch.optim.Optimizer):
        raise ValueError("symfast.train.fit: with parallel='fsdp', the argument optimizer must be a name "
                         f"({' or '.join(map(repr, OPTIMIZERS))}), not an optimizer object: FSDP2 replaces the "
                         "parameters by shards, and the optimizer has to be built on those")
    net = model
    sharded = world > 1 and parallel == "fsdp"
    if sharded:
        try:
            from torch.distributed.fsdp import fully_shard  # torch >= 2.6
        except ImportError:
            try:
                from torch.distributed._composable.fsdp import fully_shard  # torch 2.4, 2.5
            except ImportError:
                raise ValueError("symfast.train.fit: parallel='fsdp' needs FSDP2 (fully_shard, torch >= 2.4); "
                                 f"torch {torch.__version__} has none: use parallel='ddp'") from None
        fully_shard(model)  # parameters become DTensor shards: the optimizer must be built after this
    if isinstance(optimizer, torch.optim.Optimizer) and embedding_lr_scale is not None:
        raise ValueError("symfast.train.fit: embedding_lr_scale applies to an optimizer given by name; an optimizer "
                         "object carries its own per-group lrs")
    opt = optimizer if isinstance(optimizer, torch.optim.Optimizer) else make_optimizer(
        model, optimizer, lr, embedding_lr_scale=embedding_lr_scale)
    base_lrs = [g["lr"] / lr if lr else 1.0 for g in opt.param_groups]  # per-group scale of the schedule
    run_config = {"steps": steps, "batch_size": batch_size, "lr": lr, "warmup": warmup,
                  "final_lr_fraction": final_lr_fraction, "seed": seed, "clip_grad": clip_grad,
                  "embedding_lr_scale": embedding_lr_scale,
                  "optimizer": optimizer if isinstance(optimizer, str) else type(optimizer).__name__}

    result = FitResult(steps=steps)
    start = 0
    saved_step: Optional[int] = None  # the step the checkpoint file holds, once written or resumed from
    ckpt = Path(checkpoint) if checkpoint is not None else None
    if resume and ckpt is not None and ckpt.exists():
        state = torch.load(ckpt, map_location="cpu" if sharded else device, weights_only=False)
        differ = {k: (v, run_config[k]) for k, v in state.get("config", {}).items()
                  if k in run_config and v != run_config[k]}
        if differ:
            raise ValueError(f"symfast.train.fit: cannot resume from {ckpt}: it was written with other settings ("
                             + ", ".join(f"{k}: checkpoint {a!r}, now {b!r}" for k, (a, b) in differ.items()) + ")")
        _load_states(model, opt, state["model"], state["optimizer"], sharded)
        torch.set_rng_state(state["rng"])
        if state.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        start = saved_step = state["step"]
        result.history = state["history"]
        result.resumed_from = start
        if after_step is not None and hasattr(after_step, "resumed"):
            after_step.resumed(start)  # before the first step: state read off the saved weights (a pruning mask)

    def save(step: int) -> None:
        nonlocal saved_step
        if ckpt is None:
            return
        model_state, opt_state = _full_states(model, opt, sharded, rank)  # collective under FSDP2
        if rank == 0:
            ckpt.parent.mkdir(parents=True, exist_ok=True)
            tmp = ckpt.with_suffix(ckpt.suffix + ".tmp")
            torch.save({"step": step, "model": model_state, "optimizer": opt_state,
                        "rng": torch.get_rng_state(),
                        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                        "history": result.history, "config": run_config, "meta": meta}, tmp)
            os.replace(tmp, ckpt)  # atomic: an interruption never leaves half a checkpoint
        saved_step = step
        if world > 1:
            dist.barrier()

    if world > 1 and parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        net = DDP(model, device_ids=[device.index] if getattr(device, "type", "cpu") == "cuda" else None)
    per_rank = batch_size // world

    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, initial=start, desc=desc, leave=False, dynamic_ncols=True)
    model.train()
    step = start
    try:
        while step < steps:
            g = torch.Generator().manual_seed(seed * 1_000_003 + step)
            idx = torch.randint(len(train_data), (batch_size,), generator=g)[rank * per_rank: (rank + 1) * per_rank]
            x, y = _batch(train_data, idx, device)[:2]
            cur = lr_at(step, lr=lr, steps=steps, warmup=warmup, final_fraction=final_lr_fraction)
            for grp, scale in zip(opt.param_groups, base_lrs):
                grp["lr"] = cur * scale
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(net(x), y)
            loss.backward()
            if clip_grad is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
            opt.step()
            step += 1
            if after_step is not None:
                after_step(step)
            logged = loss.detach()
            if world > 1:
                logged = logged.clone()
                dist.all_reduce(logged)
                logged /= world
            rec: Dict[str, Any] = {"step": step, "loss": float(logged), "lr": cur}
            if val_data is not None and (step % eval_every == 0 or step == steps):
                v = evaluate(model, val_data, loss_fn=loss_fn, max_samples=eval_samples, device=device)
                rec["val_loss"] = v["loss"]
                if "accuracy" in v:
                    rec["val_accuracy"] = v["accuracy"]
                sp = dcs_sparsity(model, threshold=sparsity_threshold)
                if sp is not None:
                    rec["sparsity"] = sp
                if bar is not None:
                    bar.set_postfix(loss=f"{rec['loss']:.3f}", val=f"{v['loss']:.3f}",
                                    **({} if sp is None else {"sparsity": f"{sp:.2f}"}))
            result.history.append(rec)
            if bar is not None:
                bar.update(1)
            stopping = stop_after is not None and stop_after <= step < steps  # resumed past it: after this step
            if step % checkpoint_every == 0 or step == steps or stopping:
                save(step)
            if stopping:
                result.stopped_early = True
                break
    except KeyboardInterrupt as exc:
        if isinstance(exc, Interrupted):
            raise
        raise Interrupted(desc, step, steps, ckpt, saved_step) from None
    finally:
        if bar is not None:
            bar.close()
    if val_data is not None:
        last = [h for h in result.history if "val_loss" in h]
        result.val = ({"loss": last[-1]["val_loss"], **({"accuracy": last[-1]["val_accuracy"]}
                      if "val_accuracy" in last[-1] else {})} if last else {})
    return result
