r"""Collapse and plasticity metrics.

The paper (§2, §4.4) predicts which structures symmetries produce, and so what to measure:

* rescaling symmetry -> **sparsity** (:func:`sparsity`) and **vanishing neurons**
  (:func:`vanishing_neurons`);
* rotation symmetry -> **low rank**: :func:`numerical_rank`, :func:`effective_rank`,
  :func:`approximate_rank` (the 0.99 rank used in plasticity studies), :func:`stable_rank`;
* permutation symmetry -> **homogeneity**: blocks of correlated neurons and near-identical
  neurons (:func:`homogeneity`);
* stationary conditions -> **loss of plasticity**: :func:`dead_parameters` (vanishing gradient over
  a batch, App. A.3) and :func:`dormant_units` (Sokar et al., 2023).

:class:`symfast.monitor.CollapseMonitor` records these during training and plots them;
:mod:`symfast.remedies` holds §4.4's plasticity remedies.

Matrices with more than two dims (convolution weights) are viewed as ``[shape[0], -1]``: one row
per output unit. Singular values are computed in float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Union

import torch
import torch.func as tf
from torch import Tensor, nn

from .curvature.per_sample import map_samples, per_sample_losses, single_sample_loss

__all__ = [
    "sparsity",
    "singular_values",
    "numerical_rank",
    "effective_rank",
    "approximate_rank",
    "stable_rank",
    "rank_metrics",
    "homogeneity",
    "Homogeneity",
    "vanishing_neurons",
    "dormant_units",
    "dead_parameters",
    "DeadParameters",
    "gradient_magnitude",
]

TensorSource = Union[Tensor, Mapping[str, Tensor], nn.Module, Iterable[Tensor]]


def _tensors(x: TensorSource, op: str) -> Dict[str, Tensor]:
    if isinstance(x, Tensor):
        return {"": x}
    if isinstance(x, nn.Module):
        return {n: p.detach() for n, p in x.named_parameters()}
    if isinstance(x, Mapping):
        out = {}
        for k, v in x.items():
            if not isinstance(v, Tensor):
                raise TypeError(f"{op}: x[{k!r}] must be a tensor, got {type(v).__name__}")
            out[k] = v.detach()
        return out
    try:
        items = list(x)
    except TypeError:
        raise TypeError(f"{op}: x must be a tensor, a dict of tensors, a module or an iterable of tensors, got {type(x).__name__}") from None
    for i, v in enumerate(items):
        if not isinstance(v, Tensor):
            raise TypeError(f"{op}: x[{i}] must be a tensor, got {type(v).__name__}")
    return {str(i): v.detach() for i, v in enumerate(items)}


def _check_finite(op: str, arg: str, t: Tensor) -> None:
    """NaN compares as neither small nor large and inf breaks the SVD: refuse them by name."""
    if t.is_floating_point() or t.is_complex():
        bad = int((~torch.isfinite(t)).sum().item())
        if bad:
            raise ValueError(f"{op}: {arg} must be finite, got {bad} non-finite entries (inf or NaN) of {t.numel()} "
                             f"(shape {tuple(t.shape)})")


# =============================================================================== sparsity
def sparsity(x: TensorSource, *, tol: float = 1e-6) -> float:
    """Fraction of entries with ``|theta| < tol`` (the paper's Fig. 6 uses tol = 1e-6).

    ``x``: a tensor, a dict of tensors, a module (all its parameters) or an iterable of tensors.
    Non-finite entries (NaN, inf) raise a ValueError.
    """
    ts = _tensors(x, "sparsity")
    total = sum(t.numel() for t in ts.values())
    if total == 0:
        raise ValueError("sparsity: x has no entries")
    for k, t in ts.items():
        _check_finite("sparsity", f"x[{k!r}]" if k else "x", t)
    return sum((t.abs() < tol).sum().item() for t in ts.values()) / total


# =============================================================================== ranks
def unit_rows(M: Tensor) -> Tensor:
    """``M`` as ``[shape[0], -1]``: one row per output unit."""
    # explicit width: reshape(n, -1) cannot infer -1 for an empty tensor ([0, k] or [n, 0] weights)
    return M.reshape(M.shape[0], math.prod(M.shape[1:]))


def _as_matrix(M: Tensor, op: str) -> Tensor:
    if not isinstance(M, Tensor):
        raise TypeError(f"{op}: M must be a tensor, got {type(M).__name__}")
    if M.dim() < 2:
        raise ValueError(f"{op}: M must be a matrix (>= 2 dims; more dims are viewed as [shape[0], -1]), got shape {tuple(M.shape)}")
    _check_finite(op, "M", M)
    return unit_rows(M.detach())


def _singular_values(M: Tensor, op: str) -> Tensor:
    A = _as_matrix(M, op)
    if A.numel() == 0:  # an empty matrix has no singular values (rank 0)
        return torch.zeros(0, dtype=torch.float64)
    return torch.linalg.svdvals(A.to(torch.float64))


def singular_values(M: Tensor) -> Tensor:
    """Singular values of M (viewed as ``[shape[0], -1]``), descending, in float64; empty for an
    empty matrix. Non-finite entries raise a ValueError (as in every rank metric)."""
    return _singular_values(M, "singular_values")


def numerical_rank(M: Tensor, *, tol: Optional[float] = None) -> int:
    """Number of singular values above ``tol``; by default ``sigma_max * max(m, n) * eps(M.dtype)``
    (the convention of ``numpy.linalg.matrix_rank``)."""
    s = _singular_values(M, "numerical_rank")
    if s.numel() == 0:
        return 0
    if tol is None:
        A = _as_matrix(M, "numerical_rank")
        eps = torch.finfo(M.dtype).eps if M.is_floating_point() else torch.finfo(torch.float64).eps
        tol = s[0].item() * max(A.shape) * eps
    return int((s > tol).sum().item())


def _effective_rank_from(s: Tensor) -> float:
    total = s.sum()
    if total.item() == 0:
        return 0.0
    p = s / total
    p = p[p > 0]
    return math.exp(-(p * p.log()).sum().item())


def effective_rank(M: Tensor) -> float:
    r"""Effective rank (Roy & Vetterli, 2007): :math:`\exp(-\sum_i p_i \log p_i)` with
    :math:`p_i = \sigma_i / \sum_j \sigma_j`. Equals k for k equal nonzero singular values; 0 for a
    zero matrix."""
    return _effective_rank_from(_singular_values(M, "effective_rank"))


def _approximate_rank_from(s: Tensor, threshold: float) -> int:
    total = s.sum()
    if total.item() == 0:
        return 0
    c = torch.cumsum(s, 0) / total
    # the smallest k with c[k-1] >= threshold (a tiny slack absorbs the rounding of cumsum)
    return int((c < threshold - 1e-12).sum().item()) + 1


def approximate_rank(M: Tensor, *, threshold: float = 0.99) -> int:
    r"""The smallest k whose top singular values hold ``threshold`` of their sum:
    :math:`\min\{k : \sum_{i \le k} \sigma_i \ge 0.99 \sum_i \sigma_i\}` (srank_0.01 of Kumar et al.,
    2021; the "0.99 approximate rank" or "stable rank" of plasticity studies). 0 for a zero matrix."""
    if not 0 < threshold <= 1:
        raise ValueError(f"approximate_rank: threshold must be in (0, 1], got {threshold}")
    return _approximate_rank_from(_singular_values(M, "approximate_rank"), threshold)


def stable_rank(M: Tensor) -> float:
    r"""The classical stable rank :math:`\|M\|_F^2 / \|M\|_2^2 = \sum_i \sigma_i^2 / \sigma_1^2`
    (a continuous lower bound of the rank). 0 for a zero matrix."""
    s = _singular_values(M, "stable_rank")
    if s.numel() == 0 or s[0].item() == 0:
        return 0.0
    return (s.pow(2).sum() / s[0] ** 2).item()


def rank_metrics(M: Tensor, *, threshold: float = 0.99) -> Dict[str, float]:
    """All four ranks from one SVD: ``numerical_rank``, ``effective_rank``, ``approximate_rank``
    and ``stable_rank``."""
    s = _singular_values(M, "rank_metrics")
    A = _as_matrix(M, "rank_metrics")
    eps = torch.finfo(M.dtype).eps if M.is_floating_point() else torch.finfo(torch.float64).eps
    if s.numel() == 0 or s[0].item() == 0:
        return {"numerical_rank": 0, "effective_rank": 0.0, "approximate_rank": 0, "stable_rank": 0.0}
    return {
        "numerical_rank": int((s > s[0].item() * max(A.shape) * eps).sum().item()),
        "effective_rank": _effective_rank_from(s),
        "approximate_rank": _approximate_rank_from(s, threshold),
        "stable_rank": (s.pow(2).sum() / s[0] ** 2).item(),
    }


# =============================================================================== homogeneity
@dataclass
class Homogeneity:
    """Result of :func:`homogeneity`.

    Attributes:
        correlation: ``[n, n]`` neuron correlation matrix, rows and columns sorted by ``order``.
        order: the sorting permutation (ascending entries of the top eigenvector of the
            correlation matrix, sign fixed so that the eigenvector sums to >= 0).
        labels: ``[n]`` block label of each neuron (original order): connected components of the
            graph ``corr_ij >= corr_threshold``.
        block_count: blocks with at least ``min_block_size`` neurons.
        block_sizes: sizes of those blocks, descending.
        near_identical_fraction: fraction of neurons with at least one near-identical partner
            (``2|t_i - t_j|^2 / (|t_i|^2 + |t_j|^2) < near_identical``).
        near_identical_pair_fraction: fraction of the ``n(n-1)/2`` pairs that are near-identical.
    """

    correlation: Tensor
    order: Tensor
    labels: Tensor
    block_count: int
    block_sizes: List[int]
    near_identical_fraction: float
    near_identical_pair_fraction: float


def _correlation(X: Tensor) -> Tensor:
    """Pearson correlation between the rows of X (float64); a constant row correlates 0 with the
    others and 1 with itself."""
    Xc = X - X.mean(1, keepdim=True)
    norm = Xc.norm(dim=1)
    Z = Xc / torch.where(norm > 0, norm, torch.ones_like(norm))[:, None]
    C = (Z @ Z.T).clamp(-1, 1)
    C.fill_diagonal_(1.0)
    return C


def _components(adj: Tensor) -> Tensor:
    """Connected-component labels (the smallest member index) of a symmetric boolean adjacency,
    by min-label propagation."""
    n = adj.shape[0]
    labels = torch.arange(n)
    big = torch.full((n, n), n, dtype=torch.long)
    adj = adj | torch.eye(n, dtype=torch.bool)
    while True:
        new = torch.where(adj, labels[None, :], big).min(1).values
        new = new[new]  # pointer jumping: converges in O(log diameter) rounds
        if torch.equal(new, labels):
            return labels
        labels = new


def homogeneity(
    neurons: Tensor,
    *,
    activations: Optional[Tensor] = None,
    near_identical: float = 0.1,
    corr_threshold: float = 0.9,
    min_block_size: int = 2,
) -> Homogeneity:
    r"""Homogeneity of a layer's neurons (permutation symmetry, Theorem 3; paper Fig. 1 right).

    Args:
        neurons: ``[n, ...]``, one row per neuron: its parameter vector :math:`\theta_i` (e.g. the
            incoming weights and bias, or those and the outgoing weights). Used for the
            near-identical fraction, and for the correlation matrix when ``activations`` is None.
        activations: optional ``[samples, n]`` (neuron dim last, as a layer outputs them): when
            given, the correlation matrix is that of the neurons' activations over the samples,
            as in the paper's Fig. 1/5.
        near_identical: threshold on :math:`2\|\theta_i-\theta_j\|^2/(\|\theta_i\|^2+\|\theta_j\|^2)`
            (two zero neurons count as identical).
        corr_threshold: neurons correlated at least this much are linked; blocks are the
            connected components.
        min_block_size: the smallest component counted as a block.
    """
    if not isinstance(neurons, Tensor) or neurons.dim() < 1:
        raise ValueError(f"homogeneity: neurons must be a tensor [n, ...] with one row per neuron, got {getattr(neurons, 'shape', type(neurons).__name__)}")
    # small n x n computations: done on the CPU in float64 whatever the input's device
    T = unit_rows(neurons.detach()).to(device="cpu", dtype=torch.float64)
    n = T.shape[0]
    if activations is not None:
        if not isinstance(activations, Tensor) or activations.dim() != 2 or activations.shape[1] != n:
            raise ValueError(f"homogeneity: activations must have shape [samples, {n}] (n = neurons.shape[0]), got {tuple(getattr(activations, 'shape', ()))}")
        C = _correlation(activations.detach().to(device="cpu", dtype=torch.float64).T)
    else:
        C = _correlation(T)
    if n == 0:
        empty = torch.zeros(0, 0, dtype=torch.float64)
        return Homogeneity(empty, torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), 0, [], 0.0, 0.0)
    evals, evecs = torch.linalg.eigh(C)
    v = evecs[:, -1]
    v = -v if v.sum() < 0 else v
    order = torch.sort(v, stable=True).indices
    labels = _components(C >= corr_threshold)
    sizes = torch.bincount(labels, minlength=n)
    blocks = sorted((s for s in sizes.tolist() if s >= min_block_size), reverse=True)
    # near-identical neurons, from the Gram matrix: |t_i - t_j|^2 = |t_i|^2 + |t_j|^2 - 2 t_i.t_j
    G = T @ T.T
    sq = G.diagonal()
    dist2 = (sq[:, None] + sq[None, :] - 2 * G).clamp_min(0)
    denom = sq[:, None] + sq[None, :]
    d = torch.where(denom > 0, 2 * dist2 / torch.where(denom > 0, denom, torch.ones_like(denom)), torch.zeros_like(denom))
    close = d < near_identical
    close.fill_diagonal_(False)
    pairs = n * (n - 1) // 2
    return Homogeneity(
        correlation=C[order][:, order],
        order=order,
        labels=labels,
        block_count=len(blocks),
        block_sizes=blocks,
        near_identical_fraction=close.any(1).double().mean().item(),
        near_identical_pair_fraction=(close.sum().item() / 2 / pairs) if pairs else 0.0,
    )


# =============================================================================== neurons and units
def vanishing_neurons(
    incoming: Union[Tensor, nn.Module],
    *,
    bias: Optional[Tensor] = None,
    outgoing: Optional[Tensor] = None,
    tol: float = 1e-6,
) -> Tensor:
    """Boolean ``[n]``: neurons whose whole parameter vector has norm ``< tol``.

    A neuron's vector is its row of ``incoming`` (``[n, ...]``), its ``bias`` entry and, when
    given, its column of ``outgoing`` (the next layer's weight, ``[out, n, ...]``). An
    ``nn.Linear``-like module as ``incoming`` supplies its weight and bias. Theorem 1's symmetric
    solution for a rescaling pair is exactly such a neuron (incoming = outgoing = 0).
    """
    if isinstance(incoming, nn.Module):
        w = getattr(incoming, "weight", None)
        if not isinstance(w, Tensor):
            raise TypeError(f"vanishing_neurons: the module {type(incoming).__name__} has no weight tensor")
        bias = getattr(incoming, "bias", None) if bias is None else bias
        incoming = w
    if not isinstance(incoming, Tensor) or incoming.dim() < 1:
        raise ValueError("vanishing_neurons: incoming must be a tensor [n, ...] or a module with a weight")
    n = incoming.shape[0]
    _check_finite("vanishing_neurons", "incoming", incoming)
    sq = unit_rows(incoming.detach()).double().pow(2).sum(1)
    if isinstance(bias, Tensor):
        if bias.shape != (n,):
            raise ValueError(f"vanishing_neurons: bias must have shape ({n},), got {tuple(bias.shape)}")
        _check_finite("vanishing_neurons", "bias", bias)
        sq = sq + bias.detach().double().pow(2)
    if outgoing is not None:
        if outgoing.dim() < 2 or outgoing.shape[1] != n:
            raise ValueError(f"vanishing_neurons: outgoing must have shape [out, {n}, ...] (the next layer's weight), got {tuple(outgoing.shape)}")
        _check_finite("vanishing_neurons", "outgoing", outgoing)
        sq = sq + unit_rows(outgoing.detach().double().pow(2).transpose(0, 1)).sum(1)
    return sq.sqrt() < tol


def dormant_units(activations: Tensor, *, tau: float = 0.025, unit_dim: int = -1) -> Tensor:
    r"""Boolean mask of tau-dormant units (Sokar et al., 2023, "The dormant neuron phenomenon").

    Unit i's score is :math:`s_i = \mathbb{E}_x|h_i(x)| / \big(\frac1H\sum_k \mathbb{E}_x|h_k(x)|\big)`;
    it is dormant when :math:`s_i \le \tau`. ``tau = 0`` marks units that are exactly zero on every
    sample. ``unit_dim``: the units' dim (-1 for ``[B, H]`` outputs, 1 for ``[B, C, H, W]`` maps);
    the mean runs over every other dim. When every unit is zero all are dormant. Zero units give
    an empty mask; zero samples (the score is undefined) and non-finite entries raise a ValueError.
    """
    if not isinstance(activations, Tensor) or activations.dim() < 1:
        raise ValueError("dormant_units: activations must be a tensor with a units dim")
    a = activations.detach().movedim(unit_dim, -1)
    H = a.shape[-1]
    if H == 0:
        return torch.zeros(0, dtype=torch.bool, device=a.device)
    if a.numel() == 0:
        raise ValueError(f"dormant_units: activations has no samples (shape {tuple(activations.shape)}, units along "
                         f"dim {unit_dim}): the mean activation of a unit is undefined")
    _check_finite("dormant_units", "activations", a)
    m = a.reshape(-1, H).double().abs().mean(0)
    avg = m.mean()
    if avg.item() == 0:
        return torch.ones(H, dtype=torch.bool, device=a.device)
    return (m / avg) <= tau


@dataclass
class DeadParameters:
    """Result of :func:`dead_parameters`: ``mask[name]`` marks entries whose gradient vanishes."""

    mask: Dict[str, Tensor]
    count: int
    total: int

    @property
    def fraction(self) -> float:
        return self.count / self.total if self.total else 0.0


def dead_parameters(grads: Union[nn.Module, Mapping[str, Optional[Tensor]], Tensor], *, tol: float = 1e-8) -> DeadParameters:
    """Parameters whose gradient vanishes, ``|g| <= tol`` (the paper's count of dead parameters, App. A.3).

    ``grads``: a module (its ``.grad``; a parameter without a gradient counts as dead, since its
    gradient is identically zero), a dict of gradient magnitudes, or a tensor. For the strict
    "vanishing over a batch" (zero for every sample, not only on average) pass
    :func:`gradient_magnitude` ``(loss_fn, params, batch)``, the per-sample maximum.
    """
    if isinstance(grads, nn.Module):
        items = {n: (p.grad if p.grad is not None else torch.zeros_like(p)) for n, p in grads.named_parameters()}
    elif isinstance(grads, Tensor):
        items = {"": grads}
    elif isinstance(grads, Mapping):
        items = {}
        for n, g in grads.items():
            if not isinstance(g, Tensor):
                raise TypeError(f"dead_parameters: grads[{n!r}] must be a tensor, got {type(g).__name__}")
            items[n] = g
    else:
        raise TypeError(f"dead_parameters: grads must be a module, a dict of tensors or a tensor, got {type(grads).__name__}")
    mask = {n: g.detach().abs() <= tol for n, g in items.items()}
    return DeadParameters(mask, sum(int(m.sum().item()) for m in mask.values()), sum(m.numel() for m in mask.values()))


def gradient_magnitude(
    loss_fn: Callable[[Any, Any], Tensor],
    params: Mapping[str, Tensor],
    batch: Any,
    *,
    per_sample: bool = True,
    chunk_size: int = 64,
) -> Dict[str, Tensor]:
    """``max_i |d l(theta, x_i) / d theta|`` per entry (per-sample gradients from the per-sample engine,
    :mod:`symfast.curvature.per_sample`, ``chunk_size`` samples at a time), or with ``per_sample=False``
    ``|d mean_i l_i / d theta|``.

    ``loss_fn(params, batch)`` returns per-sample losses ``[B]`` (the engine's batch convention).
    """
    op = "gradient_magnitude"
    losses, samples = per_sample_losses(op, loss_fn, params, batch)
    params = {k: v.detach() for k, v in params.items()}
    if not per_sample:
        g = tf.grad(lambda p: loss_fn(p, batch).mean())(params)
        return {k: v.abs() for k, v in g.items()}
    one = tf.grad(single_sample_loss(loss_fn, samples))
    out = {k: torch.zeros_like(v) for k, v in params.items()}
    for part in samples.chunks(chunk_size) if samples.size else []:
        g, _ = map_samples(op, one, params, part)
        for k in out:
            out[k] = torch.maximum(out[k], g[k].abs().amax(0))
    return out


# Names that lived here before the monitor and the remedies got modules of their own.
_MOVED = {"CollapseMonitor": "monitor", "add_random_bias": "remedies", "add_gradient_noise": "remedies",
          "GradientNoise": "remedies"}


def __getattr__(name: str):
    if name in _MOVED:
        import importlib
        import warnings

        module = _MOVED[name]
        warnings.warn(f"symfast.metrics.{name} is deprecated; use symfast.{module}.{name}",
                      DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(f"symfast.{module}"), name)
    raise AttributeError(f"module 'symfast.metrics' has no attribute {name!r}")
