r"""The baselines a ``symfast train`` run compares its DCS model with, and the inference timing.

:func:`prune_like` (global L1 magnitude pruning to the DCS model's number of zeros),
:func:`freeze_zeros` (a masked fine-tune keeps the zeros a model has),
:class:`GradualMagnitude` (gradual magnitude pruning, GMP, Zhu & Gupta 2017, with a global or a
per-layer-uniform threshold, on plain weights or on the unpenalized ``theta = w * u``),
:func:`svd_truncate` (the best rank-r approximation, for the lowrank structure) and
:func:`inference_speedup` (dense against exported forward time).

Why two masking mechanisms: a fixed mask (one-shot pruning, every masked fine-tune) uses
``torch.nn.utils.prune``, whose mask travels with the module (deep copies, FSDP2's sharded copy).
GMP's mask grows during training and, for the ``w * u`` control, must zero two factors whose product
is the weight, which one ``prune`` mask on a parameter cannot express; so :class:`GradualMagnitude`
multiplies the masked tensors by the mask after every optimizer step (``fit(after_step=...)``), as
Zhu & Gupta's own implementation does. The mask is ``weight != 0`` between pruning steps, so it
lives in the weights and a resumed run recovers it from them.
"""

from __future__ import annotations

import copy
import time
from typing import Any, Dict, List, Optional

import torch
from torch import nn
from torch.nn.utils import prune

from ..conversion import convert
from ..exporting import _check_finite

__all__ = ["Diverged", "check_finite", "prune_like", "make_pruning_permanent", "freeze_zeros", "gmp_schedule",
           "gmp_sparsity", "magnitude_masks", "GradualMagnitude", "svd_truncate", "inference_speedup"]


class Diverged(ValueError):
    """A model holds NaN or inf in a weight or buffer: its training diverged. The message names the layer."""


def check_finite(fn: str, model: nn.Module) -> None:
    """:class:`Diverged`, naming the layer and saying that the run diverged, when a weight or buffer of ``model``
    is NaN or inf: the check :func:`symfast.export` and :func:`symfast.sparsity_report` make, so that a
    diverged baseline fails as loudly as a diverged DCS model. Pruning NaN would not fail by itself: a
    magnitude order with NaN in it is arbitrary, and the run would report a loss of NaN naming no layer."""
    try:
        _check_finite(fn, model)
    except ValueError as exc:
        raise Diverged(str(exc)) from None


def _weighted_modules(model: nn.Module, names) -> list:
    return [(model.get_submodule(n), "weight") for n in names]


def prune_like(model: nn.Module, names, zeros: int) -> None:
    """Global L1 magnitude pruning of the ``weight`` of the modules ``names`` to exactly ``zeros`` zeros (masks stay).

    The pruned ``weight`` attributes are left detached (the pruning hook recomputes them from
    ``weight_orig * weight_mask`` at every forward), so the model can still be deep-copied.
    A model with NaN or inf weights (a diverged run) is a :class:`Diverged` error naming the layer.
    """
    check_finite("train.prune_like", model)
    prune.global_unstructured(_weighted_modules(model, names), pruning_method=prune.L1Unstructured, amount=int(zeros))
    for m, name in _weighted_modules(model, names):
        setattr(m, name, getattr(m, name).detach())


def make_pruning_permanent(model: nn.Module, names) -> None:
    """Removes the pruning masks of :func:`prune_like`, keeping the pruned weights as plain parameters."""
    for m, name in _weighted_modules(model, names):
        prune.remove(m, name)


def freeze_zeros(model: nn.Module, names) -> None:
    """Masks the ``weight`` of the plain modules ``names`` where it is exactly zero (``prune.custom_from_mask``),
    so that training keeps those zeros; :func:`make_pruning_permanent` removes the masks after."""
    for m, name in _weighted_modules(model, names):
        prune.custom_from_mask(m, name, getattr(m, name) != 0)
        setattr(m, name, getattr(m, name).detach())


def gmp_sparsity(step: int, *, final: float, start: int, every: int, events: int) -> float:
    r"""Zhu & Gupta's cubic schedule: the sparsity GMP holds after ``step``.

    :math:`s_t = s_f \left(1 - \left(1 - \frac{t - t_0}{n \Delta t}\right)^3\right)` at the
    pruning steps :math:`t = t_0, t_0 + \Delta t, \dots, t_0 + n \Delta t`, held constant in between;
    0 before :math:`t_0` and :math:`s_f` after :math:`t_0 + n \Delta t`.
    """
    if step < start:
        return 0.0
    t = min(start + (step - start) // every * every, start + events * every)
    return final * (1.0 - (1.0 - (t - start) / (events * every)) ** 3)


def gmp_schedule(steps: int) -> Dict[str, int]:
    """``{"start", "every", "events"}`` of GMP in a training phase of ``steps`` steps.

    Pruning starts after 10% of the phase (the dense start that Zhu & Gupta keep) and reaches its
    final sparsity at 60%, in up to 10 equal increments, so that the last 40% (and the masked
    fine-tune after it) trains at the final mask, as the DCS model trains past its sparsity.
    """
    if steps < 1:
        raise ValueError(f"gmp_schedule: steps must be >= 1, got {steps}")
    start = steps // 10
    span = max(1, min(steps - start, round(0.5 * steps)))
    every = max(1, span // 10)
    return {"start": start, "every": every, "events": max(1, span // every)}


def _factors(model: nn.Module, names) -> Dict[str, List[torch.Tensor]]:
    """``{name: tensors whose product is the layer's weight}``: ``[weight]`` for a plain layer, ``[w, u]`` for an
    elementwise DCS layer without a free part."""
    out = {}
    for n in names:
        m = model.get_submodule(n)
        p = getattr(m, "parametrization", None)
        if p is None:
            out[n] = [m.weight]
        elif getattr(p, "kind", None) == "elementwise" and p.mask is None:
            out[n] = [p.w, p.u]
        else:
            raise ValueError(f"GradualMagnitude: layer {n!r} must be a plain layer or an elementwise DCS layer "
                             f"without a mask, got {type(m).__name__} with {type(p).__name__}")
    return out


@torch.no_grad()
def magnitude_masks(scores: Dict[str, torch.Tensor], sparsity: float, *, uniform: bool) -> Dict[str, torch.Tensor]:
    """Keep-masks zeroing the ``round(sparsity * n)`` smallest ``scores``: over all layers at once (one global
    threshold), or ``uniform``: ``round(sparsity * n_l)`` in each layer. Ties are broken by position."""
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"magnitude_masks: sparsity must be in [0, 1], got {sparsity}")
    groups = {n: [n] for n in scores} if uniform else {None: list(scores)}
    masks = {}
    for members in groups.values():
        flat = torch.cat([scores[n].reshape(-1) for n in members])
        k = round(sparsity * flat.numel())
        keep = torch.ones_like(flat, dtype=torch.bool)
        if k:
            keep[torch.topk(flat, k, largest=False, sorted=False).indices] = False
        for n, part in zip(members, keep.split([scores[n].numel() for n in members])):
            masks[n] = part.view_as(scores[n])
    return masks


class GradualMagnitude:
    r"""GMP as an ``after_step`` hook of :func:`fit`: prunes the layers ``names`` of ``model`` by magnitude
    (the plain weight, or ``|w * u|`` of an elementwise DCS layer) to :func:`gmp_sparsity` at each
    pruning step, and re-applies the mask after every step (pruned weights stay zero).

    ``uniform``: every layer to the same sparsity; otherwise one global threshold over all of them.
    At each pruning step a model with NaN or inf weights (the run diverged) is a :class:`Diverged` error
    naming the layer.
    """

    def __init__(self, model: nn.Module, names, *, final: float, start: int, every: int, events: int,
                 uniform: bool) -> None:
        if not 0.0 <= final <= 1.0:
            raise ValueError(f"GradualMagnitude: final sparsity must be in [0, 1], got {final}")
        self.tensors = _factors(model, names)
        self.model = model
        self.final, self.start, self.every, self.events, self.uniform = final, start, every, events, uniform
        self.masks: Optional[Dict[str, torch.Tensor]] = None

    @classmethod
    def keep_zeros(cls, model: nn.Module, names) -> "GradualMagnitude":
        """A hook that prunes nothing more and keeps the zeros the layers have now (a masked fine-tune)."""
        hook = cls(model, names, final=0.0, start=0, every=1, events=0, uniform=False)
        hook.masks = {n: s != 0 for n, s in hook.scores().items()}
        return hook

    def scores(self) -> Dict[str, torch.Tensor]:
        out = {}
        for n, ts in self.tensors.items():
            s = ts[0].detach().abs()
            for t in ts[1:]:
                s = s * t.detach().abs()
            out[n] = s
        return out

    def resumed(self, step: int) -> None:
        """:func:`fit` calls it when it resumes at ``step``, before the next optimizer step: past the first pruning
        step, the mask is the checkpoint's zeros. Read after that step instead, Adam would have moved the pruned
        weights off zero and the mask would keep them all."""
        if step >= self.start and self.events > 0:
            self.masks = {n: s != 0 for n, s in self.scores().items()}

    def is_pruning_step(self, step: int) -> bool:
        return self.events > 0 and self.start <= step <= self.start + self.events * self.every and (step - self.start) % self.every == 0

    @torch.no_grad()
    def __call__(self, step: int) -> None:
        if step < self.start:
            return
        if self.masks is None and step > self.start:  # resumed between pruning steps: the pruned weights are zero
            self.masks = {n: s != 0 for n, s in self.scores().items()}
        self._apply()  # first undo the step's regrowth, so that pruned weights score 0 and stay pruned
        if self.is_pruning_step(step):
            check_finite("train.GradualMagnitude", self.model)
            sp = gmp_sparsity(step, final=self.final, start=self.start, every=self.every, events=self.events)
            self.masks = magnitude_masks(self.scores(), sp, uniform=self.uniform)
            self._apply()

    def _apply(self) -> None:
        if self.masks is None:
            return
        for n, ts in self.tensors.items():
            for t in ts:
                t.mul_(self.masks[n])


@torch.no_grad()
def svd_truncate(model: nn.Module, ranks: Dict[str, int]) -> nn.Module:
    r"""A copy of the plain ``model`` whose layers ``ranks`` (``{name: r}``) hold the best rank-``r`` approximation
    of their weight, as two trainable factors.

    Each weight, viewed as the matrix ``(shape[0], prod(shape[1:]))`` (as :func:`symfast.convert`'s
    lowrank structure views it), has the SVD ``U S V^T``; the layer becomes a lowrank DCS layer with
    ``alpha = 0`` (no penalty) and factors ``a = U_r S_r^{1/2}``, ``b = V_r S_r^{1/2}``, so its
    weight ``a b^T`` is the Eckart-Young truncation and stays of rank ``<= r`` when trained.
    ``r = 0`` gives zero factors of width one, which training cannot move (both gradients vanish).
    :func:`symfast.export` turns the result into plain (thin where smaller) torch layers.
    A model with NaN or inf weights (a diverged run) is a :class:`Diverged` error naming the layer.
    """
    check_finite("train.svd_truncate", model)
    out = copy.deepcopy(model)
    factors = {}
    for name, r in ranks.items():
        w = out.get_submodule(name).weight
        mat = w.double().reshape(w.shape[0], -1)
        if not 0 <= r <= min(mat.shape):
            raise ValueError(f"svd_truncate: rank for {name!r} must be in [0, {min(mat.shape)}], got {r}")
        u, sv, vh = torch.linalg.svd(mat, full_matrices=False)
        root = sv[:r].sqrt()
        a, b = u[:, :r] * root, vh[:r].t() * root
        if r == 0:
            a, b = mat.new_zeros(mat.shape[0], 1), mat.new_zeros(mat.shape[1], 1)
        factors[name] = (a.to(w.dtype), b.to(w.dtype))
        w.zero_()  # rank 0: accepted by any rank below; the factors are set after the conversion
    out = convert(out, structure="lowrank", alpha=0.0, include=lambda n, m: n in ranks,
                  rank=lambda n, m: max(1, ranks[n]) if n in ranks else None, warn=False)
    for name, (a, b) in factors.items():
        p = out.get_submodule(name).parametrization
        p.a.copy_(a)
        p.b.copy_(b)
    return out


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
