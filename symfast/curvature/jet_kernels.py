r"""The fused second-order jet ops, as the Taylor-mode rules of :mod:`.jets` call them.

A second-order jet of a tensor ``x`` along ``K`` directions is ``(x, x1, x2)``: ``x`` the primal
(shape ``S``), ``x1`` and ``x2`` the first and second derivatives along ``t`` of
``x(theta + t n_k)``, stacked with a leading ``K``: shape ``[K, *S]``. A missing tangent (None)
counts as zero. Every op reads ``(x, x1, x2)`` and returns ``(y, y1, y2)`` with
``y1 = f'(x) x1`` and ``y2 = f'(x) x2 + f''(x)[x1, x1]``, ``y1`` and ``y2`` of shape
``[K, *S_out]``, in one pass over memory. With ``second=False`` (Taylor mode for first-order
quantities) the ops compute ``y`` and ``y1`` only and return an empty ``(0,)`` y2: no second
tangent is written, nor the terms only it needs.

Each function calls its compiled ``torch.ops.symfast.jet_*`` op (``csrc/cpu``, ``csrc/cuda``)
directly, with the op's positional signature: the rules run once per op of the model, so the
Python wrappers' second round of argument checks (the C++ kernels check the same) is not paid
here. Their pure-PyTorch twins are in :mod:`symfast.reference`. Under ``make_fx`` (the replay of
:mod:`.replay`) the calls are recorded as the ops themselves, which have fake kernels.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from ..ops import jet_pointwise as _jet_pointwise  # noqa: F401  (fake kernels and autograd of the ops)
from ..ops import jet_rows as _jet_rows  # noqa: F401

__all__ = ["jet_activation", "jet_dcs", "jet_dcs_group", "jet_layer_norm", "jet_rms_norm", "jet_softmax",
           "jet_cross_entropy", "ACTIVATIONS"]

Tensor = torch.Tensor
Jet = Tuple[Tensor, Tensor, Tensor]

ACTIVATIONS = ("gelu", "gelu_tanh", "silu", "tanh", "sigmoid", "relu", "softplus")

_ops = torch.ops.symfast


def jet_activation(x: Tensor, x1: Optional[Tensor], x2: Optional[Tensor], kind: str, beta: float = 1.0,
                   threshold: float = 20.0, second: bool = True) -> Jet:
    """Jet of an elementwise activation ``kind`` (see ``ACTIVATIONS``)."""
    return _ops.jet_activation(x, x1, x2, kind, beta, threshold, second)


def jet_dcs(w: Tensor, u: Tensor, v: Optional[Tensor], mask: Optional[Tensor], w1: Optional[Tensor],
            u1: Optional[Tensor], v1: Optional[Tensor], w2: Optional[Tensor], u2: Optional[Tensor],
            v2: Optional[Tensor], second: bool = True) -> Jet:
    """Jet of ``symfast.dcs``: theta = where(mask, w * u, v)."""
    return _ops.jet_dcs(w, u, v, mask, w1, u1, v1, w2, u2, v2, second)


def jet_dcs_group(w: Tensor, s: Tensor, dim: int, w1: Optional[Tensor], s1: Optional[Tensor],
                  w2: Optional[Tensor], s2: Optional[Tensor], second: bool = True) -> Jet:
    """Jet of ``symfast.dcs_group``: theta = w * s broadcast along ``dim``; s1, s2 are ``[K, G]``."""
    return _ops.jet_dcs_group(w, s, dim, w1, s1, w2, s2, second)


def jet_layer_norm(x: Tensor, x1: Optional[Tensor], x2: Optional[Tensor], normalized_shape: Sequence[int],
                   weight: Optional[Tensor], bias: Optional[Tensor], weight1: Optional[Tensor],
                   bias1: Optional[Tensor], weight2: Optional[Tensor], bias2: Optional[Tensor], eps: float,
                   second: bool = True) -> Jet:
    """Jet of ``F.layer_norm`` with its affine part (weight and bias may carry jets)."""
    return _ops.jet_layer_norm(x, x1, x2, list(normalized_shape), weight, bias, weight1, bias1, weight2, bias2,
                               float(eps), second)


def jet_rms_norm(x: Tensor, x1: Optional[Tensor], x2: Optional[Tensor], normalized_shape: Sequence[int],
                 weight: Optional[Tensor], weight1: Optional[Tensor], weight2: Optional[Tensor],
                 eps: Optional[float], second: bool = True) -> Jet:
    """Jet of y = x * rsqrt(mean(x^2) + eps) * weight (F.rms_norm; eps None: finfo(x.dtype).eps)."""
    if eps is None:
        eps = torch.finfo(x.dtype).eps
    return _ops.jet_rms_norm(x, x1, x2, list(normalized_shape), weight, weight1, weight2, float(eps), second)


def jet_softmax(x: Tensor, x1: Optional[Tensor], x2: Optional[Tensor], dim: int, log: bool,
                second: bool = True) -> Jet:
    """Jet of ``softmax(x, dim)``, or of ``log_softmax`` with ``log=True``."""
    return _ops.jet_softmax(x, x1, x2, dim, log, second)


def jet_cross_entropy(z: Tensor, z1: Optional[Tensor], z2: Optional[Tensor], target: Tensor,
                      ignore_index: int = -100, second: bool = True) -> Jet:
    """Jet of ``F.cross_entropy(z, target, reduction='none')`` for logits ``[N, C]``: loss ``[N]``,
    l1 and l2 ``[K, N]``; rows whose target is ``ignore_index`` give 0."""
    return _ops.jet_cross_entropy(z, z1, z2, target, ignore_index, second)
