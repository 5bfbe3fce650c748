r"""Exporting a converted model back to plain torch modules, and its sparsity report.

The module is ``symfast.exporting``; its functions are public as ``symfast.export`` and
``symfast.sparsity_report`` (a module named ``export`` would be shadowed by the function).

* :func:`export` returns plain torch modules computing the same function, with
  the structure's small parts set to exact zeros and dead units physically
  removed (batch norm folded where a dead unit's constant output passes through it);
* :func:`sparsity_report` tabulates zeros, dead groups, rank and parameter
  counts before and after export.
"""

from __future__ import annotations

import copy
import numbers
import warnings
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from .conversion import require_module
from .nn.layers import DCSLayer
from .nn.structures import Group, LowRank, rank_tolerance

__all__ = ["export", "sparsity_report", "SparsityReport"]


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
    require_module("export", model)
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
    require_module("sparsity_report", model)
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
            row["rank"] = int((sv > rank_tolerance(sv, rows_, cols_, theta.dtype, threshold)).sum())
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
