r"""Collapse and plasticity metrics, a training monitor, and the paper's two plasticity remedies.

The paper (§2, §4.4) predicts which structures symmetries produce, and so what to measure:

* rescaling symmetry -> **sparsity** (:func:`sparsity`) and **vanishing neurons**
  (:func:`vanishing_neurons`);
* rotation symmetry -> **low rank**: :func:`numerical_rank`, :func:`effective_rank`,
  :func:`approximate_rank` (the 0.99 rank used in plasticity studies), :func:`stable_rank`;
* permutation symmetry -> **homogeneity**: blocks of correlated neurons and near-identical
  neurons (:func:`homogeneity`);
* stationary conditions -> **loss of plasticity**: :func:`dead_parameters` (vanishing gradient over
  a batch, App. A.3) and :func:`dormant_units` (Sokar et al., 2023).

:class:`CollapseMonitor` records these during training and plots them with matplotlib.
:func:`add_random_bias` and :func:`add_gradient_noise` are §4.4's remedies as one-line hooks: a
fixed random offset ``w -> w + beta`` moves every mirror off the origin (so weight decay no longer
pulls towards the symmetric solution), and gradient noise removes the absorbing states.

Matrices with more than two dims (convolution weights) are viewed as ``[shape[0], -1]``: one row
per output unit. Singular values are computed in float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.func as tf
from torch import Tensor, nn

from .symmetry import _batch_leaves, _check_per_sample, _single_sample_fn

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
    "CollapseMonitor",
    "add_random_bias",
    "add_gradient_noise",
    "GradientNoise",
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
def _rows(M: Tensor) -> Tensor:
    # explicit width: reshape(n, -1) cannot infer -1 for an empty tensor ([0, k] or [n, 0] weights)
    return M.reshape(M.shape[0], math.prod(M.shape[1:]))


def _as_matrix(M: Tensor, op: str) -> Tensor:
    if not isinstance(M, Tensor):
        raise TypeError(f"{op}: M must be a tensor, got {type(M).__name__}")
    if M.dim() < 2:
        raise ValueError(f"{op}: M must be a matrix (>= 2 dims; more dims are viewed as [shape[0], -1]), got shape {tuple(M.shape)}")
    _check_finite(op, "M", M)
    return _rows(M.detach())


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
    T = _rows(neurons.detach()).to(device="cpu", dtype=torch.float64)
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
    sq = _rows(incoming.detach()).double().pow(2).sum(1)
    if isinstance(bias, Tensor):
        if bias.shape != (n,):
            raise ValueError(f"vanishing_neurons: bias must have shape ({n},), got {tuple(bias.shape)}")
        _check_finite("vanishing_neurons", "bias", bias)
        sq = sq + bias.detach().double().pow(2)
    if outgoing is not None:
        if outgoing.dim() < 2 or outgoing.shape[1] != n:
            raise ValueError(f"vanishing_neurons: outgoing must have shape [out, {n}, ...] (the next layer's weight), got {tuple(outgoing.shape)}")
        _check_finite("vanishing_neurons", "outgoing", outgoing)
        sq = sq + _rows(outgoing.detach().double().pow(2).transpose(0, 1)).sum(1)
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
    """``max_i |d l(theta, x_i) / d theta|`` per entry (per-sample gradients via ``torch.func.vmap``,
    ``chunk_size`` samples at a time), or with ``per_sample=False`` ``|d mean_i l_i / d theta|``.

    ``loss_fn(params, batch)`` returns per-sample losses ``[B]``.
    """
    op = "gradient_magnitude"
    losses, dims = _check_per_sample(op, loss_fn, params, batch)
    params = {k: v.detach() for k, v in params.items()}
    if not per_sample:
        g = tf.grad(lambda p: loss_fn(p, batch).mean())(params)
        return {k: v.abs() for k, v in g.items()}
    B = losses.shape[0]
    leaves, spec = _batch_leaves(batch)
    one = tf.grad(_single_sample_fn(loss_fn, spec, dims))
    out = {k: torch.zeros_like(v) for k, v in params.items()}
    for s in range(0, B, chunk_size):
        chunk = [l[s:s + chunk_size] if d == 0 else l for l, d in zip(leaves, dims)]
        try:
            g = tf.vmap(one, in_dims=(None, *dims))(params, *chunk)
            for k in out:
                out[k] = torch.maximum(out[k], g[k].abs().amax(0))
        except (RuntimeError, NotImplementedError):
            n = next(l.shape[0] for l, d in zip(chunk, dims) if d == 0)
            for i in range(n):
                g = one(params, *[l[i] if d == 0 else l for l, d in zip(chunk, dims)])
                for k in out:
                    out[k] = torch.maximum(out[k], g[k].abs())
    return out


# =============================================================================== monitor
def _units_view(out: Any, max_samples: int, channels_first: bool) -> Optional[Tensor]:
    """A layer output as [samples, units]: units are the last dim for linear layers, dim 1 for
    convolution maps ([B, C, ...])."""
    if isinstance(out, (tuple, list)):
        out = out[0] if out else None
    if not isinstance(out, Tensor) or out.dim() < 2 or not out.is_floating_point():
        return None
    x = out.detach()
    if channels_first:
        x = x.movedim(1, -1)
    if x.numel() == 0:
        return None  # no units or no samples: no activation metrics
    return x.reshape(-1, x.shape[-1])[:max_samples]


class CollapseMonitor:
    """Records collapse metrics during training and plots them.

    ::

        monitor = CollapseMonitor(model, every=10)
        for step, (x, y) in enumerate(loader):
            loss = loss_fn(model(x), y)
            loss.backward()
            monitor.step(loss=loss.item())    # after backward, before zero_grad
            opt.step(); opt.zero_grad()
        monitor.plot(path="collapse.png")
        monitor.close()                        # removes the activation hooks

    Per step it records ``sparsity`` (all parameters, ``|theta| < sparsity_tol``) and
    ``dead_fraction`` (entries with ``|grad| <= dead_tol``, when gradients exist), and for each
    tracked layer ``"<layer>/<metric>"``: the four ranks of the weight (:func:`rank_metrics`), the
    fraction of vanishing neurons and of near-identical neurons (rows of the weight), and, from the
    layer's output in the last forward pass (captured by a forward hook), the fraction of dormant
    units, the number of correlated blocks (:func:`homogeneity` on the activations) and the
    effective rank of the features. Extra keyword values given to :meth:`step` (e.g. the loss) are
    recorded as they are.

    Args:
        layers: names of modules to track; default: every module with a weight of >= 2 dims
            (linear and convolution layers, DCS layers).
        every: record every ``every``-th call of :meth:`step`.
        activations: capture layer outputs (forward hooks) for the activation metrics.
        max_samples: rows of each captured output used by the activation metrics.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        layers: Optional[Sequence[str]] = None,
        every: int = 1,
        activations: bool = True,
        sparsity_tol: float = 1e-6,
        vanish_tol: float = 1e-6,
        dead_tol: float = 1e-8,
        dormant_tau: float = 0.025,
        near_identical: float = 0.1,
        corr_threshold: float = 0.9,
        max_samples: int = 1024,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"CollapseMonitor: model must be an nn.Module, got {type(model).__name__}")
        if every < 1:
            raise ValueError(f"CollapseMonitor: every must be >= 1, got {every}")
        self.model = model
        mods = dict(model.named_modules())
        if layers is None:
            layers = [n for n, m in mods.items()
                      if isinstance(getattr(m, "weight", None), Tensor) and m.weight.dim() >= 2 and not isinstance(m, nn.MultiheadAttention)]
        missing = [n for n in layers if n not in mods]
        if missing:
            raise KeyError(f"CollapseMonitor: layers {missing} are not modules of the model (have {list(mods)[:10]})")
        # checked now, not at the first measure(): every tracked layer needs a matrix weight
        for n in layers:
            w = getattr(mods[n], "weight", None)
            if not isinstance(w, Tensor) or w.dim() < 2:
                got = f"a weight of shape {tuple(w.shape)}" if isinstance(w, Tensor) else "no weight tensor"
                raise ValueError(f"CollapseMonitor: layers entry {n!r} ({type(mods[n]).__name__}) must have a weight "
                                 f"of >= 2 dims (linear, convolution or DCS layers), got {got}")
        if not any(p.numel() for p in model.parameters()):
            raise ValueError(f"CollapseMonitor: model ({type(model).__name__}) must have parameters with entries to "
                             f"monitor, got {sum(1 for _ in model.parameters())} parameters and no entries")
        self.layers = list(layers)
        self.every = every
        self.opts = dict(sparsity_tol=sparsity_tol, vanish_tol=vanish_tol, dead_tol=dead_tol, dormant_tau=dormant_tau,
                         near_identical=near_identical, corr_threshold=corr_threshold)
        self.max_samples = max_samples
        self.history: List[Dict[str, float]] = []
        self._calls = 0
        self._acts: Dict[str, Tensor] = {}
        self._handles = []
        if activations:
            for n in self.layers:
                self._handles.append(mods[n].register_forward_hook(self._hook(n)))

    def _hook(self, name: str):
        def hook(module, inp, out):
            v = _units_view(out, self.max_samples, isinstance(module, nn.modules.conv._ConvNd))
            if v is not None:
                self._acts[name] = v
        return hook

    def close(self) -> None:
        """Removes the forward hooks."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self._acts = {}

    def __enter__(self) -> "CollapseMonitor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @torch.no_grad()
    def measure(self) -> Dict[str, float]:
        """The metrics now (without recording them)."""
        o = self.opts
        rec: Dict[str, float] = {"sparsity": sparsity(self.model, tol=o["sparsity_tol"])}
        params = list(self.model.parameters())
        if any(p.grad is not None for p in params):
            rec["dead_fraction"] = dead_parameters(self.model, tol=o["dead_tol"]).fraction
        mods = dict(self.model.named_modules())
        for name in self.layers:
            m = mods[name]
            w = m.weight.detach()
            for k, v in rank_metrics(w).items():
                rec[f"{name}/{k}"] = float(v)
            if w.shape[0] == 0:
                continue  # no neurons: the ranks are 0, the per-neuron fractions undefined
            b = getattr(m, "bias", None)
            b = b if isinstance(b, Tensor) and b.shape == (w.shape[0],) else None
            rec[f"{name}/vanishing_fraction"] = vanishing_neurons(w, bias=b, tol=o["vanish_tol"]).double().mean().item()
            rows = torch.cat([_rows(w), b[:, None]], 1) if b is not None else w
            rec[f"{name}/near_identical_fraction"] = homogeneity(rows, near_identical=o["near_identical"]).near_identical_fraction
            a = self._acts.get(name)
            if a is not None and a.shape[0] >= 2:
                rec[f"{name}/dormant_fraction"] = dormant_units(a, tau=o["dormant_tau"]).double().mean().item()
                if a.shape[1] == w.shape[0]:
                    rec[f"{name}/block_count"] = float(homogeneity(rows, activations=a, corr_threshold=o["corr_threshold"]).block_count)
                rec[f"{name}/feature_effective_rank"] = effective_rank(a)
        return rec

    def step(self, step: Optional[int] = None, **extra: float) -> Optional[Dict[str, float]]:
        """Records the metrics on every ``every``-th call; returns the record (None when skipped)."""
        i = self._calls if step is None else int(step)
        self._calls += 1
        if i % self.every:
            return None
        rec = {"step": float(i), **self.measure()}
        for k, v in extra.items():
            rec[k] = float(v.item() if isinstance(v, Tensor) else v)
        self.history.append(rec)
        return rec

    def keys(self) -> List[str]:
        out: Dict[str, None] = {}
        for r in self.history:
            out.update(dict.fromkeys(k for k in r if k != "step"))
        return list(out)

    def series(self, key: str) -> Tuple[List[float], List[float]]:
        """(steps, values) of one metric over the recorded steps where it exists."""
        pts = [(r["step"], r[key]) for r in self.history if key in r]
        if not pts and key not in self.keys():
            raise KeyError(f"CollapseMonitor.series: no metric {key!r}; recorded: {self.keys()}")
        return [p[0] for p in pts], [p[1] for p in pts]

    def plot(self, metrics: Optional[Sequence[str]] = None, *, path: Optional[str] = None, ncols: int = 3):
        """One panel per metric kind (the part after ``/``), one line per layer.

        ``metrics``: metric kinds or full keys to show (default: all). Returns a
        ``matplotlib.figure.Figure`` (made without pyplot, so no global state or display is
        touched); ``path`` saves it too.
        """
        from matplotlib.figure import Figure

        if not self.history:
            raise ValueError("CollapseMonitor.plot: nothing recorded yet; call step() during training")
        keys = self.keys()
        groups: Dict[str, List[str]] = {}
        for k in keys:
            kind = k.split("/")[-1]
            if metrics is None or kind in metrics or k in metrics:
                groups.setdefault(kind, []).append(k)
        if not groups:
            raise ValueError(f"CollapseMonitor.plot: none of {list(metrics or [])} was recorded; recorded: {keys}")
        n = len(groups)
        ncols = min(ncols, n)
        nrows = math.ceil(n / ncols)
        fig = Figure(figsize=(4.2 * ncols, 3.0 * nrows), layout="constrained")
        axes = fig.subplots(nrows, ncols, squeeze=False).reshape(-1)
        for ax, (kind, ks) in zip(axes, groups.items()):
            for k in ks:
                xs, ys = self.series(k)
                ax.plot(xs, ys, label=k.rsplit("/", 1)[0] if "/" in k else k)
            ax.set_title(kind)
            ax.set_xlabel("step")
            if len(ks) > 1 or "/" in ks[0]:
                ax.legend(fontsize=7)
        for ax in axes[n:]:
            ax.set_visible(False)
        if path is not None:
            fig.savefig(path, dpi=120)
        return fig


# =============================================================================== remedies (§4.4)
class _FixedOffset(nn.Module):
    """Parametrization ``theta = original + beta`` with a fixed (buffer) beta."""

    def __init__(self, beta: Tensor, keep_function: bool) -> None:
        super().__init__()
        self.register_buffer("beta", beta)
        self.keep_function = keep_function

    def forward(self, original: Tensor) -> Tensor:
        return original + self.beta

    def right_inverse(self, value: Tensor) -> Tensor:
        return value - self.beta if self.keep_function else value


def add_random_bias(
    model: nn.Module,
    *,
    std: float = 1e-2,
    seed: int = 0,
    include: Optional[Callable[[str, Tensor], bool]] = None,
    keep_function: bool = False,
) -> List[str]:
    r"""§4.4 remedy (1): bias every parameter by a fixed random constant, ``w_i -> w_i + beta_i``.

    Registered with ``torch.nn.utils.parametrize``: the trained tensor is the ``original`` and the
    module sees ``original + beta`` (``beta ~ N(0, std^2)``, a buffer, seeded; the paper's App. A.3
    uses std 1e-2). Every mirror through the origin of the trained tensors moves to ``-beta``, so
    weight decay (acting on the originals) no longer pulls the model onto the symmetric solution
    (footnote 9).

    Args:
        include: ``include(name, param)`` selects the parameters (default: all).
        keep_function: False (the paper's recipe, for use at initialization): the module computes
            with ``current + beta``. True: the originals are set to ``current - beta``, so the
            model computes exactly the same function as before the call. Then a model already
            on a stationary condition stays there under plain SGD (the gradient still vanishes);
            weight decay, which pulls the originals to 0 and so the weights to ``beta``, is what
            moves it off.

    Returns the names of the parameters it biased. Note that parametrized parameters appear in
    ``state_dict`` as ``<module>.parametrizations.<name>.original`` (and ``.0.beta``).
    """
    from torch.nn.utils import parametrize

    g = torch.Generator().manual_seed(seed)
    todo = []
    for mname, m in model.named_modules():
        if ".parametrizations." in f".{mname}." or mname.endswith("parametrizations"):
            continue
        for pname, p in list(m._parameters.items()):
            if p is None:
                continue
            full = f"{mname}.{pname}" if mname else pname
            if include is None or include(full, p):
                todo.append((m, pname, full, p))
    for m, pname, full, p in todo:
        beta = (std * torch.randn(p.shape, generator=g, dtype=torch.float64)).to(device=p.device, dtype=p.dtype)
        parametrize.register_parametrization(m, pname, _FixedOffset(beta, keep_function))
    return [t[2] for t in todo]


class GradientNoise:
    """Handle of :func:`add_gradient_noise`; ``remove()`` detaches the hooks."""

    def __init__(self, handles: list) -> None:
        self._handles = handles

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def add_gradient_noise(
    target: Union[nn.Module, torch.optim.Optimizer, Iterable[Tensor]],
    *,
    std: float = 1e-2,
    seed: int = 0,
) -> GradientNoise:
    r"""§4.4 remedy (2): add Gaussian noise ``N(0, std^2)`` to every gradient, removing the
    stationary conditions (absorbing states). The paper's App. A.3 uses variance 1e-4 (std 1e-2).

    ``target``: an optimizer (noise is added once per ``optimizer.step()``, by a step pre-hook, to
    every gradient that exists), or a module / iterable of parameters (noise is added when each
    gradient has been accumulated, by ``register_post_accumulate_grad_hook``: once per backward).
    Each parameter draws from its own generator seeded from ``seed``, so runs are reproducible.
    """
    if std < 0:
        raise ValueError(f"add_gradient_noise: std must be >= 0, got {std}")

    def noise_for(i: int, p: Tensor, gens: Dict[int, torch.Generator]) -> Tensor:
        if i not in gens:
            gens[i] = torch.Generator(device=p.device).manual_seed(seed * 1_000_003 + i)
        return std * torch.randn(p.shape, generator=gens[i], device=p.device, dtype=p.dtype)

    gens: Dict[int, torch.Generator] = {}
    if isinstance(target, torch.optim.Optimizer):
        def pre_hook(opt, args, kwargs):
            i = 0
            for group in opt.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        p.grad.add_(noise_for(i, p, gens))
                    i += 1
        return GradientNoise([target.register_step_pre_hook(pre_hook)])
    params = list(target.parameters()) if isinstance(target, nn.Module) else list(target)
    handles = []
    for i, p in enumerate(params):
        if not isinstance(p, Tensor) or not p.requires_grad:
            raise TypeError(f"add_gradient_noise: target[{i}] must be a tensor that requires grad")

        def hook(param, i=i):
            param.grad.add_(noise_for(i, param, gens))

        handles.append(p.register_post_accumulate_grad_hook(hook))
    return GradientNoise(handles)
