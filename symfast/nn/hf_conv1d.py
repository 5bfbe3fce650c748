r"""DCSConv1D: the DCS twin of transformers' ``Conv1D`` (GPT-2, GPT, CTRL, ...), not ``nn.Conv1d``.

transformers' ``Conv1D(nf, nx)`` is a linear layer whose weight is stored
transposed, shape ``(nx, nf) = (in, out)``: ``y = x W + b`` (``torch.addmm``).
Its twin keeps that layout, so ``layer.weight`` reads exactly as the original's
and code written for ``Conv1D`` (``isinstance``, ``.weight.shape``, ``nf``/``nx``)
keeps working. Because dimension 1 of theta is the output:

* ``structure="group"``: ``group_dim`` is a dimension of theta, as for every DCS
  layer, so the default, ``group_dim=1``, groups output units (neuron pruning,
  what ``group_dim=0`` does for :class:`~symfast.nn.DCSLinear`); ``group_dim=0``
  groups input features.
* ``constrain_bias=True`` with output groups joins the bias to its unit's
  group: theta_aug is theta with the bias as one more *row*, ``(nx + 1, nf)``.
* ``"lowrank"`` factors theta = A B^T with A ``(nx, r)``, B ``(nf, r)`` (the nuclear
  norm does not care about the layout); export makes two thin ``Conv1D``.
* ``"mirror"``: ``mirror_dim=1`` acts along output units (``mirror_dim=0`` on a
  DCSLinear).

This module imports transformers; :mod:`symfast.nn` loads it only when
``symfast.nn.DCSConv1D`` is asked for, and :func:`symfast.convert` only when the
model holds a ``Conv1D`` (transformers is then already imported).
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.nn import init

from transformers.pytorch_utils import Conv1D

from .layers import DCSLayer, layer_options

__all__ = ["DCSConv1D"]


class DCSConv1D(DCSLayer, Conv1D):
    r"""transformers' Conv1D with a structured weight: y = x theta + b, theta = T(factors), shape (nx, nf).

    Same arguments as ``Conv1D(nf, nx)`` (nf outputs, nx inputs; it always has a
    bias), plus ``device``/``dtype`` and the keyword-only structure options of
    :mod:`symfast.nn.layers`. A fresh layer draws theta as ``Conv1D`` does
    (normal, std 0.02; zero bias), with the same random numbers.
    """

    _dense_cls = Conv1D
    _default_group_dim = 1
    _out_dim = 1

    def __init__(
        self,
        nf: int,
        nx: int,
        *,
        device=None,
        dtype=None,
        structure: str = "elementwise",
        alpha: float = 0.0,
        group_dim: Optional[int] = None,
        rank: Optional[int] = None,
        mask: Optional[Tensor] = None,
        mirror: Optional[Tensor] = None,
        mirror_dim: Optional[int] = None,
        constrain_bias: bool = False,
    ) -> None:
        # Conv1D.__init__ would allocate and draw a dense weight: set its attributes directly.
        nn.Module.__init__(self)
        self.nf = nf
        self.nx = nx
        self._parameters["weight"] = None  # the placeholder _setup_dcs replaces
        self._setup_dcs(
            torch.Size((nx, nf)), True,
            **layer_options(structure, alpha, group_dim, rank, mask, mirror, mirror_dim, constrain_bias, device, dtype),
        )
        self._finish_init()

    @classmethod
    def _options_from(cls, module: Conv1D) -> Dict[str, Any]:
        return dict(nf=module.nf, nx=module.nx)

    # theta_aug holds the bias as one more row: dimension 1 indexes the units.
    def _joint_shape(self, weight_shape: torch.Size) -> Tuple[int, int]:
        return (weight_shape[0] + 1, weight_shape[1])

    def _join(self, weight: Tensor, bias: Tensor) -> Tensor:
        return torch.cat([weight, bias.reshape(1, -1).to(weight)], dim=0)

    def _split(self, aug: Tensor) -> Tuple[Tensor, Tensor]:
        return aug[:-1], aug[-1]

    def _draw_initial(self, device, dtype) -> Tuple[Tensor, Optional[Tensor]]:
        theta = torch.empty(self._weight_shape, device=device, dtype=dtype)
        bias = torch.zeros(self.nf, device=device, dtype=dtype)
        init.normal_(theta, std=0.02)  # Conv1D.__init__
        return theta, bias

    def forward(self, input: Tensor) -> Tensor:
        # Conv1D.forward's own ops (addmm on the 2-d view), so the function is the same bit for bit.
        weight, bias = self.weight_and_bias()
        out = torch.addmm(bias, input.reshape(-1, input.size(-1)), weight)
        return out.view(input.size()[:-1] + (self.nf,))

    def _make_dense(self, shape, has_bias, device, dtype) -> nn.Module:
        return _empty_conv1d(shape[1], shape[0], device, dtype)

    def _thin(self, threshold, bias):
        left, right = self.parametrization.thin_factors(threshold)  # theta ~ left @ right^T: (nx, r), (nf, r)
        r = left.shape[1]
        # Conv1D always has a bias: the first thin layer's (zero) bias counts too. Rank 0:
        # Conv1D's forward cannot take zero inputs (view(-1, 0)), so a dead layer exports as
        # the dense all-zero Conv1D, which computes the same function: its bias.
        if r == 0 or r * (self.nx + self.nf + 1) >= self.nx * self.nf:
            return None
        first = _empty_conv1d(r, self.nx, left.device, left.dtype)
        second = _empty_conv1d(self.nf, r, left.device, left.dtype)
        first.weight.copy_(left)
        first.bias.zero_()
        second.weight.copy_(right.t())
        second.bias.copy_(bias)
        return nn.Sequential(first, second)

    def __repr__(self) -> str:
        return nn.Module.__repr__(self)  # Conv1D's own __repr__ would hide the structure

    def extra_repr(self) -> str:
        return f"nf={self.nf}, nx={self.nx}, " + self._dcs_repr()


def _empty_conv1d(nf: int, nx: int, device, dtype) -> Conv1D:
    """An uninitialized Conv1D(nf, nx) on ``device``/``dtype``: Conv1D draws its weight on the CPU
    from the global generator, which an export must neither spend nor pay for."""
    with torch.device("meta"):
        layer = Conv1D(nf, nx)
    return layer.to_empty(device=device).to(dtype)
