r"""The mirrors of modules whose weight is a DCS factorization (``symfast.nn`` layers), found by probing."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Dict, List, Tuple

import torch
import torch.func as tf
from torch import Tensor, nn

from .layout import ParamLayout
from .mirror import Mirror
from .constructors import double_rotation_mirror, rescaling_mirror

__all__ = ["dcs_mirrors", "ModuleMirror"]


@dataclass
class ModuleMirror:
    """A mirror that a module's parametrization creates, with what it does."""

    kind: str
    params: Tuple[str, ...]
    description: str
    mirror: Mirror


class _WeightOf(nn.Module):
    """Evaluates ``m.weight`` through ``torch.func.functional_call`` (public API only)."""

    def __init__(self, m: nn.Module) -> None:
        super().__init__()
        self.m = m

    def forward(self) -> Tensor:
        return self.m.weight


def computed_weight(module: nn.Module) -> bool:
    w = getattr(module, "weight", None) if not isinstance(module, nn.MultiheadAttention) else None
    own = dict(module.named_parameters(recurse=False))
    return isinstance(w, Tensor) and "weight" not in own and not isinstance(w, nn.Parameter)


def dcs_candidates(module: nn.Module, prefix: str, seed: int = 0):
    """Probes ``module.weight`` for the factor mirrors of a DCS-style parametrization.

    For every pair of the module's parameters (a, b): the sign flip of both, and, when a, b and
    the weight have the same shape, the per-entry swap and antiswap. Each is probed with random
    factor values (so the probe is never vacuous) and kept when the weight is unchanged; the
    per-entry mirrors are restricted to the entries the weight depends on (a DCS mask).
    Returns (candidate, passed, detail) triples.
    """
    wrapper = _WeightOf(module)
    named = {n: p for n, p in module.named_parameters() if p.numel() > 0}
    if not named:
        return []
    g = torch.Generator().manual_seed(seed)
    rnd = {n: torch.randn(p.shape, generator=g, dtype=torch.float64).to(p) for n, p in named.items()}

    def weight(over: Dict[str, Tensor]) -> Tensor:
        with torch.no_grad():
            return tf.functional_call(wrapper, {f"m.{n}": v for n, v in {**rnd, **over}.items()}, ())

    base = weight({})
    tol = 1e-5 * (base.abs().max().item() + 1e-30) if base.is_floating_point() else 0.0
    if base.dtype == torch.float64:
        tol = 1e-12 * (base.abs().max().item() + 1e-30)
    out = []
    layout = ParamLayout(tuple(prefix + n for n in named), tuple(p.shape for p in named.values()))
    for a, b in itertools.combinations(named, 2):
        ra, rb = rnd[a], rnd[b]
        # the weight must depend on both, else every mirror is vacuous
        dep_a = (weight({a: 2 * ra}) - base).abs()
        dep_b = (weight({b: 2 * rb}) - base).abs()
        if dep_a.max() <= tol or dep_b.max() <= tol:
            continue
        dev = (weight({a: -ra, b: -rb}) - base).abs().max().item()
        mir = rescaling_mirror(layout, prefix + a, prefix + b, kind="sign")
        mir.description = f"sign flip of {prefix}{a} and {prefix}{b}"
        out.append((ModuleMirror("dcs-sign", (prefix + a, prefix + b), mir.description, mir), dev <= tol, dev))
        pa_, pb_ = named[a], named[b]
        if (pa_.dim() == 2 and pb_.dim() == 2 and pa_.shape[1] == pb_.shape[1]
                and not pa_.shape == pb_.shape == base.shape):
            # factors of a product A B^T (low rank): the inner space rotates, A R, B R
            r = pa_.shape[1]
            n = torch.randn(r, generator=g, dtype=torch.float64)
            n = n / n.norm()
            R = (torch.eye(r, dtype=torch.float64) - 2 * torch.outer(n, n)).to(ra)
            dev = (weight({a: ra @ R, b: rb @ R}) - base).abs().max().item()
            mir = double_rotation_mirror(layout, (prefix + a, 1), (prefix + b, 1), n)
            mir.description = f"rotation {prefix}{a} R, {prefix}{b} R of the {r}-dim inner space"
            out.append((ModuleMirror("dcs-rotation", (prefix + a, prefix + b), mir.description, mir), dev <= tol, dev))
        if named[a].shape == named[b].shape == base.shape:
            support = ((dep_a > tol) & (dep_b > tol)).reshape(-1).nonzero().reshape(-1)
            if support.numel() == 0:
                continue
            ga = [(prefix + a, tuple(torch.unravel_index(support, base.shape)))]
            gb = [(prefix + b, tuple(torch.unravel_index(support, base.shape)))]
            masked = "" if support.numel() == base.numel() else f" on the {support.numel()} entries the weight depends on"
            for kind, over, what in (
                ("swap", {a: rb, b: ra}, f"swap {prefix}{a} <-> {prefix}{b}"),
                ("antiswap", {a: -rb, b: -ra}, f"{prefix}{a} -> -{prefix}{b}, {prefix}{b} -> -{prefix}{a}"),
            ):
                dev = (weight(over) - base).abs().max().item()
                mir = rescaling_mirror(layout, ga, gb, kind=kind)
                mir.description = what + masked
                out.append((ModuleMirror(f"dcs-{kind}", (prefix + a, prefix + b), what + masked, mir), dev <= tol, dev))
    return out


def dcs_mirrors(module: nn.Module, *, prefix: str = "", params: Any = None) -> List[ModuleMirror]:
    r"""The mirrors a DCS-style module creates in its own factors (paper §4.6, eq. 10).

    Duck-typed: the module must expose a ``weight`` that it computes from its parameters (for a
    ``symfast.nn`` DCS layer, ``theta = (1 - m) v + m w u`` through ``symfast.dcs``). For each
    pair of its parameters, the factor mirrors are probed on ``module.weight`` with random values
    and kept when the weight is exactly unchanged: the sign flip of both factors (``w, u -> -w,
    -u``: condition ``w = u = 0``); for equal-shape elementwise factors the per-entry swap
    (``w = u``) and antiswap (``w = -u``), restricted to the entries the weight depends on (the
    mask); for the factors of a product ``W = a b^T`` (low rank) the rotation ``a R, b R`` of the
    inner space. A plain ``nn.Linear`` (whose weight is a parameter) has none.

    Args:
        prefix: prepended to parameter names (e.g. ``"layer1."``) so the mirrors apply to the
            whole model's parameter dict.
        params: optional whole-model params/layout: the mirrors are then placed in that layout
            (so they accept the model's flat vector too).
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"dcs_mirrors: module must be an nn.Module, got {type(module).__name__}")
    if not computed_weight(module):
        return []
    found = [m for m, ok, _ in dcs_candidates(module, prefix) if ok]
    if params is not None:
        for m in found:
            m.mirror = m.mirror.with_layout(params)
    return found
