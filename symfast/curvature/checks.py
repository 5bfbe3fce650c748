r"""Argument checks and errors of the per-sample curvature API.

Every check names the op and the argument, and says what was expected and what was received.
"""

from __future__ import annotations

import operator
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import torch

from ..ops.checks import DeviceMismatchError

__all__ = ["UnsupportedOpError"]


Tensor = torch.Tensor
Params = Mapping[str, Tensor]
LossFn = Callable[[Dict[str, Tensor], Any], Tensor]

METHODS = ("fast", "forward", "reference")


class UnsupportedOpError(RuntimeError):
    """An op whose derivatives PyTorch gets wrong (or that makes the loss random)
    was met on a path where no exact substitute exists."""


class CoupledSamplesError(UnsupportedOpError):
    """An op that couples samples met a path that evaluates parts of the batch."""


# =================================================================== checks
def describe(x: object) -> str:
    if isinstance(x, Tensor):
        return f"a tensor of shape {tuple(x.shape)}, dtype {x.dtype}"
    return type(x).__name__


def check_params(op: str, params: object) -> Dict[str, Tensor]:
    if not isinstance(params, Mapping):
        raise TypeError(f"{op}: params must be a dict of tensors, got {describe(params)}")
    if len(params) == 0:
        raise ValueError(f"{op}: params must hold at least one tensor, got an empty dict")
    out: Dict[str, Tensor] = {}
    for name, p in params.items():
        if not isinstance(p, Tensor):
            raise TypeError(f"{op}: params[{name!r}] must be a torch.Tensor, got {describe(p)}")
        if not p.is_floating_point():
            raise TypeError(f"{op}: params[{name!r}] must be a floating tensor, got dtype {p.dtype}")
        out[name] = p
    check_finite(op, "params", out)
    return out


def check_finite(op: str, arg: str, tensors: Dict[str, Tensor]) -> None:
    """Every entry finite; else a ValueError naming the tensor, its NaN and inf counts and the first bad index.

    A non-finite parameter or direction makes every derivative NaN; saying so before any
    computation beats a matrix of NaN. The screen is one sum per tensor and one host sync per
    device: a sum is finite when every entry is (NaN and inf propagate), and a single reduction is
    several times cheaper than ``isfinite(t).all()`` (which runs as several elementwise passes).
    A finite tensor whose sum overflows fails the screen and is then checked entry by entry.
    """
    by_device: Dict[torch.device, list] = {}
    for name, t in tensors.items():
        if t.device.type != "meta" and t.numel():  # no values to check
            by_device.setdefault(t.device, []).append((name, t))
    for items in by_device.values():
        if bool(torch.stack([t.sum() for _, t in items]).isfinite().all()):
            continue
        for name, t in items:
            if not bool(torch.isfinite(t).all()):
                nan, inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
                first = tuple(int(i) for i in torch.nonzero(~torch.isfinite(t))[0])
                raise ValueError(
                    f"{op}: {arg}[{name!r}] must be finite, got {nan} NaN and {inf} inf among its "
                    f"{t.numel()} entries (first at index {first})"
                )


def check_directions(
    op: str, arg: str, directions: object, params: Dict[str, Tensor], *, leading: bool
) -> Tuple[Dict[str, Tensor], int]:
    """Same keys as params; shape [K, *p.shape] (leading) or p.shape; same dtype/device.

    Returns the directions as a dict and K (1 when not leading).
    """
    if not isinstance(directions, Mapping):
        raise TypeError(f"{op}: {arg} must be a dict of tensors keyed like params, got {describe(directions)}")
    missing = [k for k in params if k not in directions]
    extra = [k for k in directions if k not in params]
    if missing:
        raise ValueError(
            f"{op}: {arg} is missing keys {missing}; it needs one tensor for every entry of params "
            f"(keys {list(params)}), zeros where the direction has no component"
        )
    if extra:
        raise ValueError(f"{op}: {arg} has keys {extra} that are not in params (keys {list(params)})")
    out: Dict[str, Tensor] = {}
    K: Optional[int] = None
    for name, p in params.items():
        d = directions[name]
        if not isinstance(d, Tensor):
            raise TypeError(f"{op}: {arg}[{name!r}] must be a torch.Tensor, got {describe(d)}")
        if leading:
            if d.dim() != p.dim() + 1 or tuple(d.shape[1:]) != tuple(p.shape):
                raise ValueError(
                    f"{op}: {arg}[{name!r}] must have shape (K, *params[{name!r}].shape) = "
                    f"(K, {', '.join(map(str, p.shape))}), got {tuple(d.shape)}"
                )
            if K is None:
                K = d.shape[0]
            elif d.shape[0] != K:
                raise ValueError(
                    f"{op}: every tensor of {arg} must have the same leading K; "
                    f"{arg}[{name!r}] has K={d.shape[0]}, earlier entries have K={K}"
                )
        elif tuple(d.shape) != tuple(p.shape):
            raise ValueError(
                f"{op}: {arg}[{name!r}] must have the shape of params[{name!r}], {tuple(p.shape)}, "
                f"got {tuple(d.shape)}"
            )
        if d.dtype != p.dtype:
            raise TypeError(f"{op}: {arg}[{name!r}] must have dtype {p.dtype} like params[{name!r}], got {d.dtype}")
        if d.device != p.device:
            raise DeviceMismatchError(
                f"{op}: {arg}[{name!r}] must be on {p.device} like params[{name!r}], got {d.device}")
        out[name] = d
    check_finite(op, arg, out)
    return out, (K if leading else 1)  # type: ignore[return-value]


def check_losses(op: str, losses: object, expected_b: Optional[int] = None) -> Tensor:
    if not isinstance(losses, Tensor):
        raise TypeError(
            f"{op}: loss_fn must return a tensor of per-sample losses of shape [B], got {describe(losses)}")
    if losses.dim() != 1:
        hint = (
            " (a scalar: build the loss with reduction='none' so it returns one loss per sample)"
            if losses.dim() == 0
            else " (average the extra dimensions per sample, e.g. losses.flatten(1).mean(1))"
        )
        raise ValueError(
            f"{op}: loss_fn must return per-sample losses of shape [B], got shape {tuple(losses.shape)}{hint}"
        )
    if not losses.is_floating_point():
        raise TypeError(f"{op}: loss_fn must return a floating tensor, got dtype {losses.dtype}")
    if expected_b is not None and losses.shape[0] != expected_b:
        raise ValueError(
            f"{op}: loss_fn returned {losses.shape[0]} losses for a batch of {expected_b} samples; "
            f"it must return one loss per sample"
        )
    return losses


def check_method(op: str, method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"{op}: method must be one of {METHODS}, got {method!r}")


def check_chunk(op: str, name: str, value: Optional[int]) -> Optional[int]:
    """None or a positive int; any integer type (numpy's too, via operator.index) becomes an int."""
    if value is None:
        return None
    try:
        index = operator.index(value) if not isinstance(value, bool) else None
    except TypeError:
        index = None
    if index is None or index < 1:
        raise ValueError(f"{op}: {name} must be None or a positive int, got {value!r}")
    return index
