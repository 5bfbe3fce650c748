r"""Whole-model tools: convert a model to DCS layers, its penalty and optimizer groups, export it back.

* :func:`convert` swaps every supported layer (nn.Linear, nn.Conv1d/2d/3d,
  nn.Embedding) for its DCS twin, keeping the function exactly, and reports
  what it converted and what it could not.
* :func:`penalty` is ``sum alpha * |factor|^2`` over the model's structures, the
  term to add to the loss; :func:`param_groups` gives optimizer groups whose
  coupled weight decay is that same penalty (use one or the other, not both).
* :func:`export` returns plain torch modules computing the same function, with
  the structure's small parts set to exact zeros and dead units physically
  removed; :func:`sparsity_report` tabulates zeros, dead groups, rank and
  parameter counts before and after export.
"""

from __future__ import annotations

import copy
import fnmatch
import numbers
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from .nn.layers import DCSConv1d, DCSConv2d, DCSConv3d, DCSEmbedding, DCSLayer, DCSLinear
from .nn.structures import STRUCTURES, Group, LowRank, Structure, _check_alpha, _rank_tol

__all__ = [
    "convert",
    "penalty",
    "param_groups",
    "export",
    "sparsity_report",
    "ConversionReport",
    "SparsityReport",
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


def _require_module(fn: str, model: Any) -> None:
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
    _require_module("convert", model)
    try:
        alpha = _check_alpha(alpha)
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
    _require_module("penalty", model)
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
    _require_module("param_groups", model)
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


# ------------------------------------------------------------------ export
_ELEMENTWISE = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Sigmoid, nn.Tanh,
    nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus, nn.Softsign, nn.Tanhshrink, nn.LogSigmoid,
    nn.Softshrink, nn.Hardshrink, nn.Threshold, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
    nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout,
)
_CONV = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}
_BN = {nn.BatchNorm1d: 1, nn.BatchNorm2d: 2, nn.BatchNorm3d: 3}


def export(model: nn.Module, *, threshold: float = 0.0) -> nn.Module:
    r"""A copy of ``model`` made of plain torch modules, computing the same function.

    Every DCS layer becomes the torch layer it replaced, with theta materialized
    and the structure's parts of size ``<= threshold`` set to exact zeros:
    entries of m * theta (elementwise), whole groups by their L2 norm (group),
    singular values (lowrank), coordinates O^T theta (mirror). The model itself
    is not changed.

    * Low rank becomes two thin layers (Linear(in, r) -> Linear(r, out), a conv
      followed by a 1x1 conv, Embedding(n, r) -> Linear(r, d)) when that has
      fewer parameters; r is the number of singular values above the threshold.
    * Dead units are physically removed inside ``nn.Sequential`` chains
      ``producer -> [elementwise activations, dropout, batch norm]* -> consumer``
      (Linear/Embedding -> Linear, ConvNd -> ConvNd, groups=1): a unit goes when
      the consumer's input column is zero (then the producer's unit and its
      batch-norm channel go too), or when the producer's unit is dead (zero
      weights) and its constant output, the bias through the chain, can be
      folded into the consumer's bias. A conv consumer with zero padding cannot
      absorb a nonzero constant exactly (the border sees the padding), so such
      a unit stays. Batch norm is folded with its running statistics (eval
      mode): export a model for inference.

    With ``threshold=0`` the exported model computes the same outputs as the
    DCS model up to float rounding (exactly for elementwise and group).
    """
    _require_module("export", model)
    threshold = _check_threshold("export", threshold)
    exported = copy.deepcopy(model)
    if hasattr(exported, "dcs_report"):
        del exported.dcs_report
    exported = _materialize(exported, threshold)
    # A module used in several places keeps its shape: shrinking it for one
    # chain would change it in the others (and slicing would untie it).
    uses: Dict[int, int] = defaultdict(int)
    for _, m in exported.named_modules(remove_duplicate=False):
        uses[id(m)] += 1
    folded_bn = []
    for seq in [m for m in exported.modules() if type(m) is nn.Sequential]:
        folded_bn += _shrink_sequential(seq, uses)
    if folded_bn and exported.training:
        warnings.warn(
            f"symfast.export: removing dead units folded their constant outputs through BatchNorm "
            f"({', '.join(sorted(set(folded_bn)))}) with its running statistics: the exported model computes "
            "the same function as the original in eval mode only (call .eval() on both to compare or deploy)",
            stacklevel=2,
        )
    return exported


def _check_threshold(fn: str, threshold: Any) -> float:
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real):
        raise TypeError(f"symfast.{fn}: threshold must be a real number >= 0, got {type(threshold).__name__}")
    if not threshold >= 0:  # also catches nan
        raise ValueError(f"symfast.{fn}: threshold must be a number >= 0, got {threshold!r}")
    return float(threshold)


@torch.no_grad()
def _materialize(model: nn.Module, threshold: float) -> nn.Module:
    if isinstance(model, DCSLayer):
        return model.to_dense(threshold)
    dense: Dict[int, nn.Module] = {}  # one dense layer per DCS layer: a layer used twice stays shared
    for parent in list(model.modules()):
        for name, child in list(parent._modules.items()):
            if isinstance(child, DCSLayer):
                if id(child) not in dense:
                    dense[id(child)] = child.to_dense(threshold)
                parent._modules[name] = dense[id(child)]
    return model


def _producer_kind(m: nn.Module) -> Optional[Tuple[str, int]]:
    if type(m) is nn.Linear:
        return ("linear", 1)
    if type(m) is nn.Embedding:
        return ("embedding", 1)
    if type(m) in _CONV and m.groups == 1:
        return ("conv", _CONV[type(m)])
    return None


def _consumer_ok(producer: Tuple[str, int], m: nn.Module) -> bool:
    kind, nd = producer
    if kind in ("linear", "embedding"):
        return type(m) is nn.Linear
    return type(m) in _CONV and _CONV[type(m)] == nd and m.groups == 1


def _chain_ok(producer: Tuple[str, int], m: nn.Module, units: int) -> bool:
    if type(m) in _ELEMENTWISE:
        return True
    if type(m) is nn.PReLU:
        return m.num_parameters in (1, units)
    if type(m) in _BN:
        nd = 1 if producer[0] in ("linear", "embedding") else producer[1]
        return _BN[type(m)] == nd and m.num_features == units and m.track_running_stats
    return False


def _out_units(m: nn.Module) -> int:
    return m.embedding_dim if isinstance(m, nn.Embedding) else m.weight.shape[0]


def _dead_outputs(m: nn.Module) -> Tensor:
    w = m.weight
    if isinstance(m, nn.Embedding):
        return (w == 0).all(dim=0)
    return (w.flatten(1) == 0).all(dim=1)  # flatten, not reshape(n, -1): n may be 0 (a rank-0 thin layer)


def _dead_inputs(m: nn.Module) -> Tensor:
    w = m.weight.transpose(0, 1)
    return (w.flatten(1) == 0).all(dim=1)


@torch.no_grad()
def _shrink_sequential(seq: nn.Sequential, uses: Dict[int, int]) -> List[str]:
    """Removes dead units pair by pair; returns the names of the batch norms a constant was folded through."""
    mods = list(seq._modules.items())
    folded_bn: List[str] = []
    for i, (pname, producer) in enumerate(mods):
        producer = seq._modules[pname]  # may have been replaced as a consumer
        kind = _producer_kind(producer)
        if kind is None:
            continue
        units = _out_units(producer)
        chain = []
        j = i + 1
        while j < len(mods) and _chain_ok(kind, seq._modules[mods[j][0]], units):
            chain.append(mods[j][0])
            j += 1
        if j == len(mods) or not _consumer_ok(kind, seq._modules[mods[j][0]]):
            continue
        cname = mods[j][0]
        consumer = seq._modules[cname]
        if consumer.weight.shape[1] != units:
            continue
        if any(uses[id(seq._modules[n])] > 1 for n in [pname, *chain, cname]):
            continue
        if _shrink_pair(seq, pname, chain, cname, kind):
            folded_bn += [n for n in chain if type(seq._modules[n]) in _BN]
    return folded_bn


def _chain_constant(seq: nn.Sequential, producer: nn.Module, chain: List[str], kind: Tuple[str, int]) -> Tensor:
    """The chain's output (eval mode) for each unit when the producer's unit outputs its bias."""
    units = _out_units(producer)
    w = producer.weight
    bias = getattr(producer, "bias", None) if not isinstance(producer, nn.Embedding) else None
    x = bias.detach().clone() if bias is not None else torch.zeros(units, dtype=w.dtype, device=w.device)
    x = x.reshape((1, units) + (1,) * (kind[1] if kind[0] == "conv" else 0))
    for name in chain:
        m = seq._modules[name]
        was = m.training
        m.eval()
        try:
            x = m(x)
        finally:
            m.train(was)
    return x.reshape(units)


def _shrink_pair(seq: nn.Sequential, pname: str, chain: List[str], cname: str, kind: Tuple[str, int]) -> bool:
    producer, consumer = seq._modules[pname], seq._modules[cname]
    dead_in = _dead_inputs(consumer)
    dead_out = _dead_outputs(producer) & ~dead_in
    if not bool(dead_in.any() or dead_out.any()):
        return False
    const = _chain_constant(seq, producer, chain, kind)
    foldable = dead_out.clone()
    if kind[0] == "conv":
        pad = consumer.padding
        zero_pad = consumer.padding_mode == "zeros" and (pad == "same" or (pad != "valid" and any(pad)))
        if zero_pad:
            foldable &= const == 0  # a nonzero constant would meet the zero padding at the border
    remove = dead_in | foldable
    keep = (~remove).nonzero().flatten()
    if keep.numel() == 0:  # keep one unit rather than make empty layers
        keep = torch.zeros(1, dtype=torch.long, device=remove.device)
        remove[0] = False
        foldable[0] = False
    if not bool(remove.any()):
        return False
    # Fold the constants of the removed dead units into the consumer's bias.
    folded = foldable & remove
    delta = None
    nonzero_fold = bool(folded.any()) and bool((const[folded] != 0).any())
    if nonzero_fold:
        wq = consumer.weight
        cols = wq[:, folded].reshape(wq.shape[0], int(folded.sum()), -1).sum(dim=2)
        delta = cols @ const[folded].to(wq.dtype)
    seq._modules[pname] = _slice_out(producer, keep)
    for name in chain:
        seq._modules[name] = _slice_chain(seq._modules[name], keep)
    seq._modules[cname] = _slice_in(consumer, keep, delta)
    # Whether a dead unit's constant output was folded: through a batch norm that
    # constant is its eval-mode value (running statistics), not the train-mode one.
    return bool(folded.any())


def _copy_common(new: nn.Module, old: nn.Module) -> nn.Module:
    new.train(old.training)
    for p_new, p_old in zip(new.parameters(), old.parameters()):
        p_new.requires_grad_(p_old.requires_grad)
    return new


def _slice_out(m: nn.Module, keep: Tensor) -> nn.Module:
    w = m.weight
    fk = dict(device=w.device, dtype=w.dtype)
    n = keep.numel()
    if type(m) is nn.Linear:
        new = nn.Linear(m.in_features, n, bias=m.bias is not None, **fk)
        new.weight.copy_(w[keep])
    elif type(m) is nn.Embedding:
        new = nn.Embedding(m.num_embeddings, n, padding_idx=m.padding_idx, max_norm=m.max_norm,
                           norm_type=m.norm_type, scale_grad_by_freq=m.scale_grad_by_freq, sparse=m.sparse, **fk)
        new.weight.copy_(w[:, keep])
        return _copy_common(new, m)
    else:
        new = type(m)(m.in_channels, n, m.kernel_size, stride=m.stride, padding=m.padding, dilation=m.dilation,
                      groups=1, bias=m.bias is not None, padding_mode=m.padding_mode, **fk)
        new.weight.copy_(w[keep])
    if m.bias is not None:
        new.bias.copy_(m.bias[keep])
    return _copy_common(new, m)


def _slice_in(m: nn.Module, keep: Tensor, bias_delta: Optional[Tensor]) -> nn.Module:
    w = m.weight
    fk = dict(device=w.device, dtype=w.dtype)
    n = keep.numel()
    has_bias = m.bias is not None or bias_delta is not None
    if type(m) is nn.Linear:
        new = nn.Linear(n, m.out_features, bias=has_bias, **fk)
    else:
        new = type(m)(n, m.out_channels, m.kernel_size, stride=m.stride, padding=m.padding, dilation=m.dilation,
                      groups=1, bias=has_bias, padding_mode=m.padding_mode, **fk)
    new.weight.copy_(w[:, keep])
    if has_bias:
        b = m.bias.detach().clone() if m.bias is not None else torch.zeros(w.shape[0], **fk)
        if bias_delta is not None:
            b = b + bias_delta
        new.bias.copy_(b)
    return _copy_common(new, m)


def _slice_chain(m: nn.Module, keep: Tensor) -> nn.Module:
    if type(m) in _BN:
        new = type(m)(keep.numel(), eps=m.eps, momentum=m.momentum, affine=m.affine,
                      track_running_stats=m.track_running_stats, device=m.running_mean.device,
                      dtype=m.running_mean.dtype)
        if m.affine:
            new.weight.copy_(m.weight[keep])
            new.bias.copy_(m.bias[keep])
        new.running_mean.copy_(m.running_mean[keep])
        new.running_var.copy_(m.running_var[keep])
        new.num_batches_tracked.copy_(m.num_batches_tracked)
        return _copy_common(new, m)
    if type(m) is nn.PReLU and m.num_parameters > 1:
        new = nn.PReLU(keep.numel(), device=m.weight.device, dtype=m.weight.dtype)
        new.weight.copy_(m.weight[keep])
        return _copy_common(new, m)
    return m


# --------------------------------------------------------- sparsity report
@dataclass
class SparsityReport:
    """Per-layer table of a DCS model; ``rows`` (dicts) and ``totals``; ``str()`` prints it.

    Row fields: name, layer, structure, alpha, shape; ``zeros`` (exact zeros of
    theta after the threshold) and ``numel``; ``dead_groups``/``groups`` (group
    structure); ``rank``/``full_rank`` (lowrank, or every layer with
    ``compute_rank=True``); ``penalty`` (alpha |factors|^2) and ``convex_penalty``
    (its minimum over factorizations: equal when the factors are balanced);
    ``params_train`` (factors and bias), ``params_dense`` (theta and bias) and
    ``params_export`` (the exported module(s), after removing dead units).
    """

    threshold: float
    rows: List[Dict[str, Any]]
    totals: Dict[str, int]

    def __str__(self) -> str:
        head = ["layer", "structure", "alpha", "shape", "zeros", "dead groups", "rank", "penalty/convex",
                "params train", "dense", "export"]
        body = []
        for r in self.rows:
            body.append([
                f"{r['name'] or '<root>'} ({r['layer']})", r["structure"], f"{r['alpha']:g}",
                "x".join(map(str, r["shape"])), f"{r['zeros']}/{r['numel']} ({r['zeros'] / max(1, r['numel']):.1%})",
                "-" if r["groups"] is None else f"{r['dead_groups']}/{r['groups']}",
                "-" if r["rank"] is None else f"{r['rank']}/{r['full_rank']}",
                f"{r['penalty']:.4g}/{r['convex_penalty']:.4g}",
                str(r["params_train"]), str(r["params_dense"]), str(r["params_export"]),
            ])
        t = self.totals
        body.append(["total (model)", "", "", "", "", "", "", "", str(t["params_train"]), str(t["params_dense"]),
                     str(t["params_export"])])
        widths = [max(len(h), *(len(row[i]) for row in body)) for i, h in enumerate(head)]
        fmt = lambda row: "  ".join(c.ljust(w) for c, w in zip(row, widths))  # noqa: E731
        lines = [f"symfast.sparsity_report(threshold={self.threshold:g})", fmt(head),
                 "  ".join("-" * w for w in widths)]
        lines += [fmt(row) for row in body]
        return "\n".join(lines)


@torch.no_grad()
def sparsity_report(model: nn.Module, *, threshold: float = 0.0, compute_rank: bool = False) -> SparsityReport:
    r"""Per-layer zeros, dead groups, rank, penalty balance and parameter counts before/after :func:`export`.

    Args:
        threshold: as in :func:`export` (the parts of size <= threshold count as zero).
        compute_rank: also compute the rank of every layer's theta (an SVD per
            layer); by default only for lowrank layers.
    """
    _require_module("sparsity_report", model)
    threshold = _check_threshold("sparsity_report", threshold)
    with warnings.catch_warnings():  # only parameters are counted here: the eval-mode caveat does not apply
        warnings.filterwarnings("ignore", message="symfast.export: removing dead units folded")
        exported = export(model, threshold=threshold)
    rows = []
    dense_total = 0
    dcs_params = set()
    for name, m in model.named_modules():
        if not isinstance(m, DCSLayer):
            continue
        p = m.parametrization
        theta = p.thresholded(threshold)
        if m._bias_mode == "joint":  # [W_g | b_g] per unit: the row describes the weight
            theta = theta[:, :-1].reshape(m._weight_shape)
        bias = getattr(m, "bias", None)  # an embedding has none
        row: Dict[str, Any] = {
            "name": name, "layer": type(m).__name__, "structure": m.structure, "alpha": m.alpha,
            "shape": tuple(m._weight_shape), "numel": int(theta.numel()), "zeros": int((theta == 0).sum()),
            "groups": None, "dead_groups": None, "rank": None, "full_rank": None,
            "penalty": float(m.penalty()), "convex_penalty": float(m.convex_penalty()),
        }
        if isinstance(p, Group):
            row["groups"] = p.shape[p.dim]
            row["dead_groups"] = int(p.dead_groups(threshold).sum())
        if isinstance(p, LowRank) or compute_rank:
            rows_, cols_ = m._weight_shape[0], m._weight_shape.numel() // m._weight_shape[0]
            sv = torch.linalg.svdvals(theta.double().reshape(rows_, cols_))
            row["rank"] = int((sv > _rank_tol(sv, rows_, cols_, theta.dtype, threshold)).sum())
            row["full_rank"] = min(rows_, cols_)
        own = list(m.parameters())
        dcs_params.update(id(q) for q in own)
        row["params_train"] = sum(q.numel() for q in own)
        row["params_dense"] = m._weight_shape.numel() + (0 if bias is None else bias.numel())
        sub = exported.get_submodule(name) if name else exported
        row["params_export"] = sum(q.numel() for q in sub.parameters())
        dense_total += row["params_dense"]
        rows.append(row)
    train_total = sum(q.numel() for q in model.parameters())
    other = sum(q.numel() for q in model.parameters() if id(q) not in dcs_params)
    totals = {
        "params_train": train_total,
        "params_dense": dense_total + other,
        "params_export": sum(q.numel() for q in exported.parameters()),
        "nonzero_export": int(sum(int((q != 0).sum()) for q in exported.parameters())),
    }
    return SparsityReport(threshold=float(threshold), rows=rows, totals=totals)
