r"""Converting a model to DCS layers, and the penalty and optimizer groups that train it.

The module is ``symfast.conversion``; its functions are public as ``symfast.convert``,
``symfast.penalty`` and ``symfast.param_groups`` (the function ``symfast.convert`` would shadow a
module of the same name, so the module is named for what it does).

* :func:`convert` swaps every supported layer (nn.Linear, nn.Conv1d/2d/3d,
  nn.Embedding) for its DCS twin, keeping the function exactly, and reports
  what it converted and what it could not.
* :func:`penalty` is ``sum alpha * |factor|^2`` over the model's structures, the
  term to add to the loss; :func:`param_groups` gives optimizer groups whose
  coupled weight decay is that same penalty (use one or the other, not both).

Exporting back to plain torch modules is :mod:`symfast.exporting`.
"""

from __future__ import annotations

import fnmatch
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from .nn.layers import DCSConv1d, DCSConv2d, DCSConv3d, DCSEmbedding, DCSLayer, DCSLinear
from .nn.structures import STRUCTURES, Structure, check_alpha

__all__ = [
    "convert",
    "penalty",
    "param_groups",
    "ConversionReport",
]

# Exact types only: a subclass may override forward, and converting it would
# silently drop that override. (NonDynamicallyQuantizableLinear, the out_proj of
# nn.MultiheadAttention, is nn.Linear with a different name and the same forward.)
_SUPPORTED: Dict[type, type] = {
    nn.Linear: DCSLinear,
    nn.modules.linear.NonDynamicallyQuantizableLinear: DCSLinear,
    nn.Conv1d: DCSConv1d,
    nn.Conv2d: DCSConv2d,
    nn.Conv3d: DCSConv3d,
    nn.Embedding: DCSEmbedding,
}

Pattern = Union[str, type, Callable[[str, nn.Module], bool]]
PerLayer = Union[Any, Dict[str, Any], Callable[[str, nn.Module], Any]]


# ------------------------------------------------------------------ report
@dataclass
class ConversionReport:
    """What :func:`convert` did: ``converted``, ``not_converted`` (with reasons) and ``excluded``.

    ``converted``: (name, from type, to type). ``not_converted``: (name, type,
    its own parameter names, reason) for every module that holds parameters and
    was left as it is although the include/exclude filters selected it.
    ``excluded``: names of modules with parameters that the filters left out.
    """

    structure: str
    alpha: float
    converted: List[Tuple[str, str, str]] = field(default_factory=list)
    not_converted: List[Tuple[str, str, Tuple[str, ...], str]] = field(default_factory=list)
    excluded: List[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"symfast.convert(structure={self.structure!r}, alpha={self.alpha:g}): "
                 f"{len(self.converted)} converted, {len(self.not_converted)} not converted, "
                 f"{len(self.excluded)} excluded"]
        for name, src, dst in self.converted:
            lines.append(f"  converted      {name or '<root>'}: {src} -> {dst}")
        for name, typ, params, reason in self.not_converted:
            lines.append(f"  NOT converted  {name or '<root>'} ({typ}; parameters {', '.join(params)}): {reason}")
        for name in self.excluded:
            lines.append(f"  excluded       {name or '<root>'}")
        return "\n".join(lines)


def _matches(patterns: Optional[Union[Pattern, Sequence[Pattern]]], name: str, module: nn.Module,
             ancestors: Sequence[Tuple[str, nn.Module]]) -> bool:
    """Whether the module, or one of its ancestors, matches one of the patterns."""
    if patterns is None:
        return False
    if isinstance(patterns, (str, type)) or callable(patterns) and not isinstance(patterns, (list, tuple)):
        patterns = [patterns]
    for n, m in list(ancestors) + [(name, module)]:
        for p in patterns:
            if isinstance(p, str):
                if n and fnmatch.fnmatchcase(n, p):
                    return True
            elif isinstance(p, type):
                if isinstance(m, p):
                    return True
            elif callable(p):
                if p(n, m):
                    return True
            else:
                raise TypeError(f"symfast.convert: include/exclude entries must be str, type or callable, got {p!r}")
    return False


def _check_patterns(arg: str, patterns) -> None:
    """include/exclude: None, a pattern, or a list/tuple of patterns (str, type or callable)."""
    if patterns is None or isinstance(patterns, (str, type)) or callable(patterns):
        return
    if not isinstance(patterns, (list, tuple)):
        raise TypeError(f"symfast.convert: {arg} must be a glob pattern (str), a module type, a callable "
                        f"(name, module) -> bool, or a list of them, got {type(patterns).__name__}")
    for p in patterns:
        if not (isinstance(p, (str, type)) or callable(p)):
            raise TypeError(f"symfast.convert: {arg} entries must be str, type or callable, got {p!r}")


def require_module(fn: str, model: Any) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"symfast.{fn}: model must be an nn.Module, got {type(model).__name__}")


# Attributes of a freshly built layer of each supported type: anything else on
# a module is the user's own, and convert carries it over to the DCS layer.
_STOCK_ATTRS: Dict[type, frozenset] = {}


def _stock_attrs(cls: type) -> frozenset:
    if cls not in _STOCK_ATTRS:
        meta = {"device": "meta"}
        fresh = (cls(1, 1, **meta) if cls in (nn.Linear, nn.modules.linear.NonDynamicallyQuantizableLinear,
                                              nn.Embedding) else cls(1, 1, 1, **meta))
        _STOCK_ATTRS[cls] = frozenset(fresh.__dict__)
    return _STOCK_ATTRS[cls]


def _unconvertible(module: nn.Module, own: Tuple[str, ...], constrain_bias: bool) -> Optional[str]:
    """Why a supported layer cannot become a DCS layer without changing what it does, or None.

    The DCS layer is a new module built from the constructor arguments, the
    weight and the bias: hooks (torch.nn.utils.prune, the old weight_norm and
    spectral_norm are hooks), child modules, buffers, other parameters and a
    frozen weight would be lost or changed silently.
    """
    hooks = [kind for kind in ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks",
                               "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
                               "_load_state_dict_post_hooks")
             if getattr(module, kind, None)]
    if hooks:
        return (f"it has hooks ({', '.join(h.strip('_') for h in hooks)}; e.g. from torch.nn.utils.prune, "
                "weight_norm or spectral_norm) that a DCS layer would not run")
    children = [n for n, c in module._modules.items() if c is not None]
    if children:
        return f"it has child modules ({', '.join(children)}) that a DCS layer would drop"
    buffers = [n for n, b in module._buffers.items() if b is not None]
    if buffers:
        return f"it has buffers ({', '.join(buffers)}) that a DCS layer would drop"
    extra = [n for n in own if n not in ("weight", "bias")]
    if extra:
        return f"it has parameters other than weight and bias ({', '.join(extra)})"
    if not module.weight.requires_grad:
        return "its weight is frozen (requires_grad=False); its DCS factors would be trainable"
    bias = module._parameters.get("bias")
    if constrain_bias and bias is not None and not bias.requires_grad:
        return "its bias is frozen (requires_grad=False) and constrain_bias=True would make it trainable"
    return None


def _per_layer(value: PerLayer, name: str, module: nn.Module) -> Any:
    if isinstance(value, dict):
        return value.get(name)
    if callable(value) and not isinstance(value, (Tensor, type)):
        return value(name, module)
    return value


def convert(
    model: nn.Module,
    *,
    structure: str = "elementwise",
    alpha: float,
    include: Optional[Union[Pattern, Sequence[Pattern]]] = None,
    exclude: Optional[Union[Pattern, Sequence[Pattern]]] = None,
    group_dim: PerLayer = None,
    rank: PerLayer = None,
    mask: PerLayer = None,
    mirror: PerLayer = None,
    mirror_dim: PerLayer = None,
    constrain_bias: bool = False,
    warn: bool = True,
) -> nn.Module:
    r"""Swaps every supported layer of ``model`` for its DCS twin, in place, and returns the model.

    Supported: ``nn.Linear`` (and ``nn.MultiheadAttention``'s ``out_proj``),
    ``nn.Conv1d/2d/3d``, ``nn.Embedding`` (exact types: a subclass may have its
    own forward). Each is replaced by :class:`~symfast.nn.DCSLinear` etc. via
    ``from_dense``, whose factors reproduce the layer's weight exactly (bit for
    bit for elementwise and group; to rounding for lowrank and mirror, which go
    through an SVD or a projection) and lie off every stationary condition. No
    random number is drawn.

    Args:
        structure: ``"elementwise"`` (lasso), ``"group"`` (group lasso),
            ``"lowrank"`` (nuclear norm) or ``"mirror"`` (|O^T theta|_1).
        alpha: the weight decay on the factors; the model's penalty is
            :func:`penalty`. Required: it sets the strength of the constraint.
        include, exclude: which modules to convert: glob patterns on qualified
            names (``"encoder.*"``), module types, or ``callable(name, module) ->
            bool``; a pattern also covers the module's descendants. Default: all.
        group_dim, rank, mask, mirror, mirror_dim: structure options (see
            :mod:`symfast.nn.layers`); each may be one value for all layers, a
            dict ``{name: value}`` or ``callable(name, module) -> value``.
        constrain_bias: put biases under DCS too (default: biases stay free).
        warn: emit one warning listing the modules with parameters that were
            not converted (they are always in the report).

    Returns:
        The model (a new module if ``model`` itself was a supported layer). Its
        attribute ``dcs_report`` is a :class:`ConversionReport`. A layer is left
        as it is, and reported with the reason, when converting would change
        what it does: a weight shared with another module (tied embeddings), a
        ``parametrize`` parametrization, hooks (``torch.nn.utils.prune``, the old
        ``weight_norm``/``spectral_norm``), child modules, buffers, parameters
        other than weight and bias, a frozen weight, an uninitialized lazy
        layer. A frozen free bias stays frozen, and the user's own attributes
        on a layer are carried over to its DCS twin.

    Raises:
        ValueError/TypeError, before anything is converted: a bad ``alpha``,
        ``include``/``exclude``, an option of another structure (``rank=`` with
        ``structure="group"``), a per-layer dict naming no supported layer,
        ``constrain_bias=True`` with ``structure="mirror"``. With
        ``constrain_bias=True``, layers without a bias get their weight
        constrained.
    """
    if structure not in STRUCTURES:
        raise ValueError(f"symfast.convert: structure must be one of {STRUCTURES}, got {structure!r}")
    require_module("convert", model)
    try:
        alpha = check_alpha(alpha)
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"symfast.convert: {exc}") from None
    _check_patterns("include", include)
    _check_patterns("exclude", exclude)
    # An option of another structure would be ignored: say so instead.
    option_of = {"group_dim": "group", "rank": "lowrank", "mask": "elementwise", "mirror": "mirror",
                 "mirror_dim": "mirror"}
    given = {"group_dim": group_dim, "rank": rank, "mask": mask, "mirror": mirror, "mirror_dim": mirror_dim}
    for opt, value in given.items():
        if value is not None and option_of[opt] != structure:
            raise ValueError(f"symfast.convert: {opt}= applies to structure={option_of[opt]!r} only; "
                             f"with structure={structure!r} it would be ignored (got {opt}={value!r})")
    if constrain_bias and structure == "mirror":
        raise ValueError("symfast.convert: constrain_bias=True is not available for structure='mirror'")
    report = ConversionReport(structure=structure, alpha=alpha)

    owners: Dict[int, set] = defaultdict(set)
    for m in model.modules():
        for p in m._parameters.values():
            if p is not None:
                owners[id(p)].add(id(m))

    replacement: Dict[int, nn.Module] = {}

    # A module reachable under several names (one layer used twice) is selected
    # when include matches one of its names and exclude matches none.
    paths: Dict[int, List[Tuple[str, List[Tuple[str, nn.Module]]]]] = defaultdict(list)

    def walk(name: str, module: nn.Module, ancestors: List[Tuple[str, nn.Module]], on_path: set) -> None:
        paths[id(module)].append((name, ancestors))
        for child_name, child in module._modules.items():
            if child is not None and id(child) not in on_path:
                walk(f"{name}.{child_name}" if name else child_name, child, ancestors + [(name, module)],
                     on_path | {id(child)})

    walk("", model, [], {id(model)})

    def is_selected(module: nn.Module) -> bool:
        routes = paths[id(module)]
        included = include is None or any(_matches(include, n, module, a) for n, a in routes)
        return included and not any(_matches(exclude, n, module, a) for n, a in routes)

    layer_names = set()  # names of the supported layers, for the per-layer dicts

    def visit(name: str, module: nn.Module, ancestors: List[Tuple[str, nn.Module]]) -> None:
        own = tuple(n for n, p in module._parameters.items() if p is not None)
        if isinstance(module, (DCSLayer, Structure)):
            return  # already DCS: its factors are the structure's
        if type(module) in _SUPPORTED:
            layer_names.update(n for n, _ in paths[id(module)])
        selected = is_selected(module)
        parametrized = torch.nn.utils.parametrize.is_parametrized(module)
        if selected and parametrized:
            # type(module) is then a generated subclass (ParametrizedLinear); its
            # parameters live in module.parametrizations, which is not visited.
            held = tuple(n for n, _ in module.named_parameters())
            report.not_converted.append(
                (name, type(module).__name__, held, "it has a torch.nn.utils.parametrize parametrization"))
            return
        if selected and isinstance(module, nn.modules.lazy.LazyModuleMixin) and module.has_uninitialized_params():
            report.not_converted.append((name, type(module).__name__, own,
                                         "a lazy module whose parameters are not initialized yet: run one forward "
                                         "pass before converting"))
            return
        if not selected:
            if own:
                report.excluded.append(name)
        elif type(module) in _SUPPORTED:
            target = _SUPPORTED[type(module)]
            reason = None
            if any(len(owners[id(getattr(module, n))]) > 1 for n in own):
                reason = "its weight is shared with another module (converting would untie it)"
            else:
                reason = _unconvertible(module, own, constrain_bias)
            if reason is None:
                try:
                    # constrain_bias applies to the layers that have a bias; the others
                    # get their weight constrained.
                    has_bias = module._parameters.get("bias") is not None
                    options = dict(
                        structure=structure, alpha=alpha, constrain_bias=constrain_bias and has_bias,
                        group_dim=_per_layer(group_dim, name, module) if structure == "group" else None,
                        rank=_per_layer(rank, name, module) if structure == "lowrank" else None,
                        mask=_per_layer(mask, name, module) if structure == "elementwise" else None,
                        mirror=_per_layer(mirror, name, module) if structure == "mirror" else None,
                        mirror_dim=_per_layer(mirror_dim, name, module) if structure == "mirror" else None,
                    )
                    if isinstance(module, nn.Embedding):
                        options.pop("constrain_bias")
                    new = target.from_dense(module, **options)
                except (ValueError, TypeError) as exc:
                    reason = str(exc)
                else:
                    bias = module._parameters.get("bias")
                    if bias is not None and not bias.requires_grad and "bias" in new._parameters:
                        new._parameters["bias"].requires_grad_(False)  # a frozen free bias stays frozen
                    stock = _stock_attrs(type(module))
                    for key, value in module.__dict__.items():  # the user's own attributes
                        if key not in stock and key not in new.__dict__:
                            new.__dict__[key] = value
                    replacement[id(module)] = new
                    report.converted.append((name, type(module).__name__, target.__name__))
                    return
            report.not_converted.append((name, type(module).__name__, own, reason))
            return
        elif own:
            base = next((c.__name__ for c in _SUPPORTED if isinstance(module, c)), None)
            reason = (f"a subclass of nn.{base} with its own class (its forward may differ); not converted"
                      if base else f"no DCS layer for {type(module).__name__}")
            report.not_converted.append((name, type(module).__name__, own, reason))
        for child_name, child in module._modules.items():
            if child is not None and id(child) not in seen:
                seen.add(id(child))
                visit(f"{name}.{child_name}" if name else child_name, child, ancestors + [(name, module)])

    seen = {id(model)}
    visit("", model, [])

    for opt, value in given.items():
        if isinstance(value, dict):
            unknown = sorted(set(value) - layer_names)
            if unknown:
                raise ValueError(
                    f"symfast.convert: {opt}= names no supported layer of the model: {unknown} "
                    f"(supported layers: {sorted(layer_names)[:8]}{' ...' if len(layer_names) > 8 else ''}); "
                    "nothing was converted")

    for parent in list(model.modules()):
        for child_name, child in list(parent._modules.items()):
            if child is not None and id(child) in replacement:
                parent._modules[child_name] = replacement[id(child)]
    model = replacement.get(id(model), model)
    model.dcs_report = report
    if warn and report.not_converted:
        by_type: Dict[str, int] = defaultdict(int)
        for _, typ, _, _ in report.not_converted:
            by_type[typ] += 1
        summary = ", ".join(f"{t} x {n}" for t, n in sorted(by_type.items()))
        warnings.warn(
            f"symfast.convert: {len(report.not_converted)} module(s) with parameters were not converted "
            f"({summary}); their parameters stay as they are. See model.dcs_report for each reason.",
            stacklevel=2,
        )
    return model


# ----------------------------------------------------------------- penalty
def _structures(model: nn.Module) -> List[Structure]:
    return [m for m in model.modules() if isinstance(m, Structure)]


def penalty(model: nn.Module) -> Tensor:
    r"""``sum alpha * |factor|^2`` over every DCS structure in ``model``: the term to add to the loss.

    At its minimum over factorizations of the same weights this is the convex
    penalty of each structure (2 alpha |theta|_1, 2 alpha sum_g |theta_g|_2,
    2 alpha |W|_*, 2 alpha |O^T theta|_1). A model without DCS layers has
    penalty 0. Add it to the loss, *or* use :func:`param_groups`, not both.
    Under FSDP2 (``fully_shard``) each rank sums its shards and the result is
    all-reduced, so every rank gets the whole penalty as a plain tensor (call
    it on every rank).
    """
    require_module("penalty", model)
    structures = _structures(model)
    if not structures:
        ref = next(model.parameters(), None)
        return torch.zeros((), device=None if ref is None else ref.device)
    total = sum(s.penalty() for s in structures)
    # Sharded parameters (FSDP2's DTensors) give a partial sum per rank;
    # full_tensor() all-reduces it (differentiably), so it adds to a plain loss.
    return total.full_tensor() if hasattr(total, "full_tensor") else total


def param_groups(model: nn.Module, *, weight_decay: float = 0.0) -> List[Dict[str, Any]]:
    r"""Optimizer parameter groups whose coupled weight decay equals :func:`penalty`.

    Every structure's penalized factors go into a group with ``weight_decay =
    2 * alpha`` (the gradient of ``alpha |p|^2`` is ``2 alpha p``, which is what
    coupled weight decay adds to the gradient); everything else (biases, free
    parts ``v``, non-DCS layers) goes into a group with ``weight_decay``
    (default 0). Use with optimizers whose weight decay is *coupled* (added to
    the gradient): ``torch.optim.SGD`` (with or without momentum) and
    ``torch.optim.Adam``. Then training minimizes ``loss + penalty(model)``
    exactly, and at convergence the model solves the convex problem (lasso,
    group lasso, ...); do not also add :func:`penalty` to the loss.

    **Decoupled decay (AdamW) is not equivalent.** AdamW shrinks ``p`` by
    ``lr * wd * p`` outside the adaptive step, so its fixed points balance the
    *normalized* gradient against the decay, not the gradient: it does not
    minimize ``loss + penalty`` and does not reach the lasso solution. Measured
    (``tests/test_penalty_equivalence.py::test_adamw_is_not_equivalent``: a
    20-feature lasso in float64 whose solution has 6 nonzeros, 4000 steps,
    lr 0.02 with cosine decay, the same groups): Adam reaches scikit-learn's
    Lasso to 1.5e-16 (relative L2) with the same support; AdamW ends 9.8%
    (relative L2; 0.16 max abs) away from it, with 13 of the 14 zero
    coefficients still above 1e-4 in magnitude, i.e. no sparsity.

    An elementwise DCS layer has two factors per weight, so the optimizer
    steps over twice the elements and its own cost doubles (on the README's
    MLP, torch's default for-loop SGD alone adds about 7% to the step); on CPU
    prefer torch's fused step
    (``torch.optim.SGD(param_groups(model), lr=..., momentum=..., fused=True)``,
    likewise Adam; torch >= 2.4), which makes one pass per tensor instead of
    several (see the README's training-step benchmark).

    The groups are a snapshot: after changing a layer's alpha, make new ones.
    """
    require_module("param_groups", model)
    decay: Dict[float, List[nn.Parameter]] = defaultdict(list)
    placed = set()
    for s in _structures(model):
        for p in s.penalized_parameters():
            if id(p) not in placed:
                placed.add(id(p))
                decay[2 * s.alpha].append(p)
    rest = [p for p in model.parameters() if id(p) not in placed]
    groups = [{"params": ps, "weight_decay": wd} for wd, ps in decay.items()]
    if rest:
        groups.append({"params": rest, "weight_decay": float(weight_decay)})
    return groups
