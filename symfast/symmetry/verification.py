r"""A numerical check that a loss has a mirror symmetry: ``l(theta, x) = l(R theta, x)``."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

import torch
from torch import Tensor

from ..curvature.per_sample import per_sample_losses
from .layout import Params, tree_norm
from .mirror import Mirror, check_mirror_fits

__all__ = ["verify", "Verification"]


@dataclass
class Verification:
    """Result of :func:`verify`: is ``l(theta, x) = l(R theta, x)`` for every sample checked?

    ``passed`` when ``max_abs_deviation <= atol + rtol * scale`` with ``scale = max_i |l(theta, x_i)|``.
    ``vacuous`` when ``R theta = theta`` (theta already satisfies ``O^T theta = 0``: ``|O^T theta| <=
    1e-12 |theta|`` for float64 losses, ``1e-6 |theta|`` otherwise, as in :func:`stationary_report`),
    in which case the check says nothing about the symmetry; ``bool(result)`` is ``passed and not
    vacuous``.
    """

    passed: bool
    vacuous: bool
    max_abs_deviation: float
    relative_deviation: float
    scale: float
    rtol: float
    atol: float
    n_samples: int
    n_batches: int
    condition_norm: float
    description: str = ""

    def __bool__(self) -> bool:
        return self.passed and not self.vacuous

    def __str__(self) -> str:
        status = "PASS" if self.passed else "FAIL"
        if self.vacuous:
            status += " (vacuous: R theta = theta)"
        return (f"{status}: max |l(R theta) - l(theta)| = {self.max_abs_deviation:.3g} (relative {self.relative_deviation:.3g}, "
                f"rtol {self.rtol:g}) over {self.n_samples} samples in {self.n_batches} batches; |O^T theta| = {self.condition_norm:.3g}")


def default_rtol(dtype: torch.dtype) -> float:
    return {torch.float64: 1e-9, torch.float32: 1e-4}.get(dtype, 2e-2)


def condition_rtol(dtype: Optional[torch.dtype]) -> float:
    """|O^T theta| <= this * |theta| counts as on the condition (R theta = theta up to rounding):
    a symmetric solution computed in float32 keeps |O^T theta| ~ 1e-8 |theta|, not 0."""
    return 1e-12 if dtype == torch.float64 else 1e-6


def verify(
    loss_fn: Callable[[Params, Any], Tensor],
    params: Params,
    mirror: Mirror,
    batches: Iterable[Any],
    *,
    rtol: Optional[float] = None,
    atol: float = 0.0,
) -> Verification:
    r"""Checks numerically that :math:`\ell(\theta, x) = \ell(R\theta, x)` for every sample.

    Args:
        loss_fn: ``loss_fn(params, batch) -> [B]`` per-sample losses.
        params: dict of tensors (or a flat tensor) in the mirror's layout.
        batches: an iterable of batches (a single tensor counts as one batch).
        rtol: relative tolerance against ``scale = max_i |l(theta, x_i)|``; default 1e-4 for
            float32 losses, 1e-9 for float64 and 2e-2 for half types: well above the rounding of
            reordered sums, far below what breaking a real symmetry does.
        atol: absolute tolerance added to it.
    """
    check_mirror_fits("verify", mirror, params)
    if isinstance(batches, Tensor):
        batches = [batches]
    return _verify(loss_fn, params, mirror, batches, rtol=rtol, atol=atol)


def _verify(loss_fn, params, mirror, batches, *, rtol, atol, losses=None, norms=None) -> Verification:
    """:func:`verify`, with the losses at ``params`` given per batch, and ``norms = (|O^T theta|,
    |theta|)``, when the caller has them (``stationary_report`` computed them: one forward less)."""
    reflected = mirror.reflect(params)
    max_dev, scale, n, nb, dtype = 0.0, 0.0, 0, 0, None
    with torch.no_grad():
        for i, batch in enumerate(batches):
            if losses is None:
                a, _ = per_sample_losses("verify", loss_fn, params, batch)
            else:
                a = losses[i].detach()
            b = loss_fn(reflected, batch)
            max_dev = max(max_dev, (b.double() - a.double()).abs().max().item() if a.numel() else 0.0)
            scale = max(scale, a.double().abs().max().item() if a.numel() else 0.0)
            n += a.shape[0]
            nb += 1
            dtype = a.dtype
        if norms is None:
            cond, tnorm = mirror.condition(params).double().norm().item(), tree_norm(params).item()
        else:
            cond, tnorm = norms
    if nb == 0:
        raise ValueError("verify: batches is empty; give at least one batch")
    rtol = default_rtol(dtype) if rtol is None else float(rtol)
    passed = max_dev <= atol + rtol * scale
    # dtype-dependent, as in stationary_report: in float32 the rounding of a symmetric solution
    # would otherwise make a mirror that is no symmetry look verified
    vacuous = cond <= condition_rtol(dtype) * max(tnorm, 1e-30) or cond == 0.0
    return Verification(passed, vacuous, max_dev, max_dev / scale if scale > 0 else (0.0 if max_dev == 0 else math.inf),
                        scale, rtol, atol, n, nb, cond, mirror.description)
