r"""The layout of a model's parameters as one flat vector, and ``flatten`` / ``unflatten``.

A dict of parameters is flattened by concatenating ``p.reshape(-1)`` in the dict's insertion order
(for a module: ``model.named_parameters()`` order).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Dict, Mapping, Tuple, Union

import torch
from torch import Tensor, nn

__all__ = ["ParamLayout", "flatten", "unflatten"]


Params = Union[Mapping[str, Tensor], Tensor]


# =============================================================================== layouts
@dataclass(frozen=True)
class ParamLayout:
    """Names and shapes of a set of parameters, and where each sits in the flat vector.

    The flat vector is ``torch.cat([p.reshape(-1) for p in params.values()])``, in this order.
    """

    names: Tuple[str, ...]
    shapes: Tuple[torch.Size, ...]

    @property
    def numels(self) -> Tuple[int, ...]:
        return tuple(math.prod(s) for s in self.shapes)

    @property
    def offsets(self) -> Tuple[int, ...]:
        return tuple(itertools.accumulate((0,) + self.numels[:-1])) if self.names else ()

    @property
    def numel(self) -> int:
        return sum(self.numels)

    def index(self, name: str) -> int:
        try:
            return self.names.index(name)
        except ValueError:
            raise KeyError(name) from None

    def shape_of(self, name: str) -> torch.Size:
        return self.shapes[self.index(name)]

    @staticmethod
    def of(params: Union[Mapping[str, Tensor], nn.Module, "ParamLayout"]) -> "ParamLayout":
        if isinstance(params, ParamLayout):
            return params
        if isinstance(params, nn.Module):
            params = dict(params.named_parameters())
        if not isinstance(params, Mapping):
            raise TypeError(f"params must be a dict of tensors or an nn.Module, got {type(params).__name__}")
        for k, v in params.items():
            if not isinstance(v, Tensor):
                raise TypeError(f"params[{k!r}] must be a tensor, got {type(v).__name__}")
        return ParamLayout(tuple(params), tuple(v.shape for v in params.values()))


def _named_values(params: Union[Mapping[str, Tensor], nn.Module]) -> Dict[str, Tensor]:
    if isinstance(params, nn.Module):
        return dict(params.named_parameters())
    return dict(params)


def flatten(params: Union[Mapping[str, Tensor], nn.Module]) -> Tensor:
    """Concatenates ``p.reshape(-1)`` over a dict of tensors (insertion order) or a module's
    ``named_parameters()``. This is the flat order every mirror built from ``params`` uses."""
    values = _named_values(params)
    if not values:
        return torch.zeros(0)
    return torch.cat([v.reshape(-1) for v in values.values()])


def unflatten(vector: Tensor, like: Union[Mapping[str, Tensor], nn.Module, ParamLayout]) -> Dict[str, Tensor]:
    """Inverse of :func:`flatten`: splits ``vector`` (shape ``[D]``) into a dict shaped like ``like``."""
    layout = ParamLayout.of(like)
    if vector.dim() != 1 or vector.shape[0] != layout.numel:
        raise ValueError(f"unflatten: vector must have shape ({layout.numel},), got {tuple(vector.shape)}")
    return {n: c.view(s) for n, s, c in zip(layout.names, layout.shapes, vector.split(list(layout.numels)))}


def default_atol(dtype: torch.dtype) -> float:
    return math.sqrt(torch.finfo(dtype).eps) if dtype.is_floating_point else 1e-6


# Arithmetic on parameters given as a dict of tensors or one flat tensor.
def tree_dot(a: Params, b: Params) -> Tensor:
    if isinstance(a, Tensor):
        return (a * b).sum()
    return sum((a[k] * b[k]).sum() for k in a)


def tree_norm(a: Params) -> Tensor:
    return tree_dot(a, a).sqrt()


def tree_scale(a: Params, s) -> Params:
    if isinstance(a, Tensor):
        return a * s
    return {k: v * s for k, v in a.items()}


def tree_randn_like(params: Params, g: torch.Generator) -> Params:
    if isinstance(params, Tensor):
        return torch.randn(params.shape, generator=g, dtype=torch.float64).to(params)
    return {k: torch.randn(v.shape, generator=g, dtype=torch.float64).to(v) for k, v in params.items()}


def flat_values(params: Params) -> Tensor:
    return params.reshape(-1) if isinstance(params, Tensor) else torch.cat([v.reshape(-1) for v in params.values()])
