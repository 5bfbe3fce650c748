"""The baselines a ``symfast train`` run compares its DCS model with, and the inference timing.

:func:`prune_like` (global L1 magnitude pruning to the DCS model's number of zeros),
:func:`svd_truncate` (the best rank-r approximation, for the lowrank structure) and
:func:`inference_speedup` (dense against exported forward time).
"""

from __future__ import annotations

import copy
import time
from typing import Any, Dict

import torch
from torch import nn
from torch.nn.utils import prune

from ..conversion import convert

__all__ = ["prune_like", "make_pruning_permanent", "svd_truncate", "inference_speedup"]


def _weighted_modules(model: nn.Module, names) -> list:
    return [(model.get_submodule(n), "weight") for n in names]


def prune_like(model: nn.Module, names, zeros: int) -> None:
    """Global L1 magnitude pruning of the ``weight`` of the modules ``names`` to exactly ``zeros`` zeros (masks stay).

    The pruned ``weight`` attributes are left detached (the pruning hook recomputes them from
    ``weight_orig * weight_mask`` at every forward), so the model can still be deep-copied.
    """
    prune.global_unstructured(_weighted_modules(model, names), pruning_method=prune.L1Unstructured, amount=int(zeros))
    for m, name in _weighted_modules(model, names):
        setattr(m, name, getattr(m, name).detach())


def make_pruning_permanent(model: nn.Module, names) -> None:
    """Removes the pruning masks of :func:`prune_like`, keeping the pruned weights as plain parameters."""
    for m, name in _weighted_modules(model, names):
        prune.remove(m, name)


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
    """
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
