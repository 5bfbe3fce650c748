r"""``stationary_report``: the numbers of Theorem 4 at a given point, computed exactly with ``torch.func``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Mapping, Optional, Union

import torch
import torch.func as tf
from torch import Tensor

from ..curvature.api import per_sample_directional_derivatives, per_sample_hvp
from ..curvature.checks import UnsupportedOpError
from ..curvature.grad_norms import per_sample_grad_norms
from ..curvature.per_sample import _known_failure, hvp, map_samples, single_sample_loss, split_batch
from .layout import Params, flat_values, tree_dot, tree_norm, tree_scale
from .mirror import Mirror, check_mirror_fits
from .verification import Verification, _verify, condition_rtol

__all__ = ["stationary_report", "StationaryReport"]

# Up to this many columns, |O^T g_i| comes from k directional derivatives (Taylor mode, about one
# forward and backward per direction, less on few touched parameters); above it from per-sample
# gradients, whose cost does not grow with k (on the README MLP, for a mirror of first-layer
# weights, both cost about 63 forward+backward passes at k = 128; at k = 64, 36 against 51).
_DIRECT_MAX_RANK = 64


@dataclass
class StationaryReport:
    r"""The numbers of Theorem 4 at ``theta`` for one mirror (see :func:`stationary_report`).

    Attributes:
        condition_norm: ``|O^T theta|``; ``theta_norm``: ``|theta|``.
        on_condition: ``|O^T theta| <= 1e-6 |theta|`` (float32) / ``1e-12 |theta|`` (float64).
        grad_condition: ``[B]``, per-sample ``|O^T grad l(theta, x_i)|`` (part 1: zero on the
            condition); ``grad_norm``: ``[B]``, ``|grad l(theta, x_i)|`` for scale.
        mean_grad_condition: ``|O^T grad L(theta)|`` for the batch mean ``L``.
        hessian_block: ``[n_pairs]``, ``|m^T H n|`` for random unit ``m`` in ``ker O^T`` and ``n``
            in ``im O`` (H: Hessian of the batch-mean loss; part 2: zero on the condition);
            ``hessian_scale``: ``|H n|``, an upper bound of ``|m^T H n|``.
        per_sample_hessian_block: ``[B, n_pairs]`` (when ``per_sample_hessian=True``).
        eigenvalues, eigenvectors, eigen_residual: the eigen-decomposition of ``O^T H O`` (``[k]``;
            eigenvectors as flat ``[D, k]`` in the params' flattening order), and
            ``|H v - lambda v|`` per direction: zero when ``im O`` is an invariant subspace of H
            (part 2), i.e. these are eigenvectors of the full Hessian. None when skipped
            (``eigen_note`` says why).
        verification: :func:`verify` on this batch.
        methods: how each quantity was computed: ``per_sample_grad_norm`` (closed form per
            layer or vmap, by parameter), ``per_sample_grad_condition`` (directional derivatives
            or per-sample gradients), ``hvp`` (vjp or jvp of grad), ``per_sample_hessian``.
    """

    condition_norm: float
    theta_norm: float
    on_condition: bool
    grad_condition: Tensor
    grad_norm: Tensor
    mean_grad_condition: float
    hessian_block: Tensor
    hessian_scale: Tensor
    per_sample_hessian_block: Optional[Tensor]
    eigenvalues: Optional[Tensor]
    eigenvectors: Optional[Tensor]
    eigen_residual: Optional[Tensor]
    eigen_note: str
    verification: Verification
    methods: Dict[str, str]

    def __str__(self) -> str:
        gc = self.grad_condition
        rel = (gc / self.grad_norm.clamp_min(1e-30)).max().item() if gc.numel() else 0.0
        hb = (self.hessian_block / self.hessian_scale.clamp_min(1e-30)).max().item() if self.hessian_block.numel() else 0.0
        lines = [
            f"|O^T theta| = {self.condition_norm:.3g} (|theta| = {self.theta_norm:.3g}; on the stationary condition: {self.on_condition})",
            f"per-sample |O^T grad l_i|: max {gc.max().item() if gc.numel() else 0:.3g} (max relative to |grad l_i|: {rel:.3g}); batch mean: {self.mean_grad_condition:.3g}",
            f"Hessian block |m^T H n| (m in ker O^T, n in im O): max {self.hessian_block.max().item():.3g} (relative to |H n|: {hb:.3g})",
            f"symmetry check on this batch: {self.verification}",
        ]
        if self.eigenvalues is not None:
            ev = ", ".join(f"{v:.3g}" for v in self.eigenvalues[:8].tolist())
            lines.append(f"eigenvalues of O^T H O: [{ev}{', ...' if self.eigenvalues.numel() > 8 else ''}]; max |H v - lambda v| = {self.eigen_residual.max().item():.3g}")
        else:
            lines.append(f"eigen-directions: {self.eigen_note}")
        return "\n".join(lines)


def stationary_report(
    loss_fn: Callable[[Params, Any], Tensor],
    params: Params,
    mirror: Mirror,
    batch: Any,
    *,
    n_pairs: int = 4,
    eigen: Union[bool, str] = "auto",
    max_eigen_rank: int = 64,
    per_sample_hessian: bool = False,
    chunk_size: Optional[int] = 64,
    seed: int = 0,
) -> StationaryReport:
    r"""Theorem 4 at ``theta = params`` for one mirror, computed exactly with ``torch.func``.

    * ``|O^T theta|``: is theta on the stationary condition?
    * per-sample ``|O^T grad l(theta, x_i)|`` (part 1: zero on the condition, for every sample:
      SGD cannot leave it), as the per-sample directional derivatives along the columns of O
      (the curvature engine's Taylor mode, one pass for all k), or for k > 64 from per-sample
      gradients of the touched parameters (``vmap(grad)``); and ``|grad l(theta, x_i)|`` for
      scale, from :func:`symfast.curvature.grad_norms.per_sample_grad_norms` (one forward and
      backward for linear, conv, embedding and layer-norm parameters, ``vmap`` for the others);
    * ``|m^T H n|`` for ``m in ker O^T``, ``n in im O`` (part 2), via Hessian-vector products
      (reverse over reverse: one linearization of ``grad``, one backward per product);
    * the eigen-decomposition of the Hessian restricted to ``im O`` (``O^T H O``, from k HVPs)
      and how far those directions are from eigenvectors of the full Hessian. For a DCS two-layer
      linear net at the origin this is eq. 6: per pair ``(w_i, u_i)`` the directions
      ``(1, 1)/sqrt(2)`` and ``(1, -1)/sqrt(2)`` with eigenvalues ``g_i`` and ``-g_i``, where
      ``g = dL/dtheta`` (``-xy`` for ``l = (x w u - y)^2 / 2``).

    Args:
        loss_fn: ``loss_fn(params, batch) -> [B]`` per-sample losses (include the weight decay in
            it for :math:`\ell_\gamma`).
        params: dict of tensors (or a flat tensor) in the mirror's layout.
        n_pairs: random (m, n) pairs for the Hessian block check.
        eigen: True, False or ``"auto"`` (when ``k <= max_eigen_rank``).
        per_sample_hessian: also check the block per sample (``[B, n_pairs]``): nested forward
            mode on the whole batch (:func:`symfast.per_sample_hvp` with ``onto``), or, for a
            model the curvature engine refuses, one HVP per sample.
        chunk_size: samples per vmap chunk where per-sample gradients are formed (the fallbacks
            above): they are reduced to ``|O^T g_i|`` and ``|g_i|`` chunk by chunk, so at most
            ``[chunk, D]`` exists at a time.
    """
    op = "stationary_report"
    check_mirror_fits(op, mirror, params)
    if n_pairs < 1:
        raise ValueError(f"{op}: n_pairs must be >= 1, got {n_pairs}")
    if eigen not in (True, False, "auto"):
        raise ValueError(f"{op}: eigen must be True, False or 'auto', got {eigen!r}")
    params = {k: v.detach() for k, v in params.items()} if isinstance(params, Mapping) else params.detach()
    methods: Dict[str, str] = {}

    # ---- part 1: |g_i| from one forward and backward (closed forms per layer, see grad_norms)
    norms = per_sample_grad_norms(loss_fn, params, batch, chunk_size=chunk_size, op=op)
    losses, grad_norm = norms.losses, norms.norms
    samples = split_batch(op, batch, losses.shape[0])
    dtype = losses.dtype
    methods["per_sample_grad_norm"] = _summary(norms.methods)
    one = single_sample_loss(loss_fn, samples)
    grad_condition, methods["per_sample_grad_condition"] = _grad_condition(op, loss_fn, one, params, mirror, batch,
                                                                           samples, chunk_size)
    cond = mirror.condition(params).double().norm().item()
    tnorm = flat_values(params).double().norm().item()

    def mean_loss(p):
        return loss_fn(p, batch).mean()

    # ---- part 2: block check
    g = torch.Generator().manual_seed(seed)
    blocks, scales, per_blocks = [], [], []
    k = mirror.rank
    do_eigen = eigen is True or (eigen == "auto" and k <= max_eigen_rank)
    # n itself is needed only without the eigen part (its own HVP) or for the per-sample block;
    # else H n comes from the columns H O, and |O z| = |z| (O's columns are orthonormal).
    need_n = not do_eigen or per_sample_hessian
    pairs = []  # (m, n, c with n = O c) per pair, drawn in a fixed order from the seeded generator
    for _ in range(n_pairs):
        z = torch.randn(mirror.rank, generator=g, dtype=torch.float64).to(dtype)
        if need_n:
            n = mirror.expand(z, like=params)
            s = 1.0 / tree_norm(n)
            n = tree_scale(n, s)
        else:
            n, s = None, 1.0 / torch.linalg.vector_norm(z)
        m = mirror.symmetric_solution(_randn_like(params, g))
        mn = tree_norm(m)
        pairs.append(None if mn.item() == 0 else (tree_scale(m, 1.0 / mn), n, z * s))  # None: ker O^T = {0}
    live = [p for p in pairs if p is not None]
    # Every Hessian-vector product from one linearization of the gradient, which also gives the mean
    # gradient. With the k columns H O at hand, H n = (H O) c for n = O c: no product of its own.
    if do_eigen:
        stacked = _expand_rows(mirror, torch.eye(k, dtype=dtype, device=losses.device), params)
        if not isinstance(stacked, Tensor):
            stacked = {n: v.to(params[n].dtype) for n, v in stacked.items()}
        columns = list(stacked) if isinstance(params, Tensor) else [{n: v[j] for n, v in stacked.items()}
                                                                   for j in range(k)]
        mean_grad, HO, hvp_method = _hvps(op, mean_loss, params, columns)
        HO = torch.stack(HO) if isinstance(params, Tensor) else {n: torch.stack([c[n] for c in HO]) for n in params}
        Hns = [_combine(HO, c) for _, _, c in live]
    else:
        mean_grad, Hns, hvp_method = _hvps(op, mean_loss, params, [n for _, n, _ in live])
    mean_grad_condition = mirror.condition(mean_grad).double().norm().item()
    Hn_of = iter(Hns)
    for pair in pairs:
        if pair is None:  # im O is everything: ker O^T = {0}
            blocks.append(torch.zeros((), dtype=torch.float64))
            scales.append(torch.zeros((), dtype=torch.float64))
            continue
        m, n, _ = pair
        Hn = next(Hn_of)
        blocks.append(tree_dot(m, Hn).abs().double())
        scales.append(tree_norm(Hn).double())
        if per_sample_hessian:
            vals, methods["per_sample_hessian"] = _per_sample_block(op, loss_fn, one, params, samples, batch, m, n,
                                                                    chunk_size)
            per_blocks.append(vals.abs().double())
    methods["hvp"] = hvp_method + (f" (the {k} columns H O; the block check's H n = (H O) c)" if do_eigen else "")

    # ---- eigen-directions of O^T H O
    evals = evecs = resid = None
    note = ""
    if do_eigen:
        # O^T (H O) through the mirror's own (sparse) map; the rest in the parameters' dtype
        A = (mirror.condition(HO) if isinstance(params, Tensor) else mirror.condition(HO, batch_dims=1)).double().T
        evals, V = torch.linalg.eigh((A + A.T) / 2)
        evecs = _columns_like(mirror, V, params)  # [D, k] float64, O V
        HOf = HO if isinstance(params, Tensor) else torch.cat([HO[n].reshape(k, -1) for n in params], 1)
        resid = (HOf.T @ V.to(dtype) - evecs.to(dtype) * evals.to(dtype)).norm(dim=0).double()
        note = f"computed from {k} Hessian-vector products"
    else:
        note = f"skipped: k = {k} > max_eigen_rank = {max_eigen_rank}" if eigen == "auto" else "skipped: eigen=False"

    eps_rel = condition_rtol(dtype)
    ver = _verify(loss_fn, params, mirror, [batch], rtol=None, atol=0.0, losses=[losses])
    return StationaryReport(
        condition_norm=cond,
        theta_norm=tnorm,
        on_condition=cond <= eps_rel * max(tnorm, 1e-30) or cond == 0.0,
        grad_condition=grad_condition,
        grad_norm=grad_norm,
        mean_grad_condition=mean_grad_condition,
        hessian_block=torch.stack(blocks),
        hessian_scale=torch.stack(scales),
        per_sample_hessian_block=torch.stack(per_blocks, 1) if per_blocks else None,
        eigenvalues=evals,
        eigenvectors=evecs,
        eigen_residual=resid,
        eigen_note=note,
        verification=ver,
        methods=methods,
    )


# What torch says when an op of the model has no double backward: only these send _hvps to forward over reverse.
_NO_DOUBLE_BACKWARD = ("is not implemented", "double backward", "does not support higher order")


def _hvps(op, f, params, vs):
    """``(grad f, [H v for v in vs], path)`` for the scalar ``f`` at ``params``.

    Reverse over reverse: one forward and backward that keeps its graph (``vjp`` of ``grad``),
    then one backward of it per direction (H is symmetric, so the vjp is H v). For a model with an
    op that has no double backward, :func:`~symfast.curvature.per_sample.hvp` per direction.
    """
    try:
        g, vjp_fn = tf.vjp(tf.grad(f), params)
        return g, [vjp_fn(v)[0] for v in vs], "vjp(grad) (reverse over reverse, one linearization)"
    except (RuntimeError, NotImplementedError) as e:
        reason = _known_failure(e, _NO_DOUBLE_BACKWARD)
    out, path = [], "jvp(grad)"
    for v in vs:
        hv, path = hvp(f, params, v, op)
        out.append(hv)
    return tf.grad(f)(params), out, f"{path} (no double backward: {reason})"


def _grad_condition(op, loss_fn, one, params, mirror, batch, samples, chunk_size):
    """``[B]`` float64 ``|O^T g_i|``, and how it was computed.

    For ``k <= _DIRECT_MAX_RANK``: the per-sample directional derivatives along the k columns of O
    (:func:`symfast.per_sample_directional_derivatives`, Taylor mode: one pass of the batch for all
    k, tangents only on the parameters the mirror touches): ``|O^T g_i|`` is the norm of row i,
    since O's columns are orthonormal. For larger k, or a model the engine refuses, per-sample
    gradients of the touched parameters by vmap, a chunk at a time, reduced at once.
    """
    k = mirror.rank
    flat = isinstance(params, Tensor)
    touched = ["theta"] if flat else list(mirror.names)
    full = {"theta": params} if flat else params
    sub = {n: full[n] for n in touched}
    rest = {n: v for n, v in full.items() if n not in sub}

    def lf(q, b):
        merged = {**rest, **q}
        return loss_fn(merged["theta"] if flat else merged, b)

    why = f"k = {k} > {_DIRECT_MAX_RANK}"
    if k <= _DIRECT_MAX_RANK:
        first = next(iter(sub.values()))
        rows = _expand_rows(mirror, torch.eye(k, dtype=first.dtype, device=first.device), params if flat else sub)
        dirs = {"theta": rows} if flat else {n: r.to(sub[n].dtype) for n, r in rows.items()}
        try:
            g = per_sample_directional_derivatives(lf, sub, dirs, batch)
            return (torch.linalg.vector_norm(g.double(), dim=1),
                    f"per_sample_directional_derivatives along the {k} columns of O (one pass)")
        except UnsupportedOpError as e:
            why = f"the curvature engine refuses the model: {str(e).splitlines()[0][:160]}"

    def grad_sub(q, *sample):
        return tf.grad(lambda r: one({**rest, **r}["theta"] if flat else {**rest, **r}, *sample))(q)

    parts, paths = [], []
    for part in samples.chunks(chunk_size):
        grads, path = map_samples(op, grad_sub, sub, part)
        paths.append(path)
        gcond = mirror.condition(grads["theta"]) if flat else mirror.condition(grads, batch_dims=1)
        parts.append(gcond.double().norm(dim=-1))
        del grads
    out = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)
    return out, f"{next((p for p in paths if p != 'vmap'), 'vmap')} per-sample gradients of {touched} ({why})"


def _summary(methods: Dict[str, str]) -> str:
    """One line from per_sample_grad_norms' per-parameter methods: ``path: names; path: names``."""
    by: Dict[str, list] = {}
    for name, m in methods.items():
        by.setdefault(m, []).append(name)
    return "; ".join(f"{m}: {', '.join(names)}" for m, names in by.items())


def _per_sample_block(op, loss_fn, one, params, samples, batch, m, n, chunk_size):
    """``[B]`` values of m^T H(x_i) n, and how they were computed.

    Nested forward mode on the whole batch (:func:`symfast.curvature.per_sample_hvp` with ``onto``:
    a few passes of the batch, no per-sample parameter-sized tensor); where the curvature engine
    refuses the model (an op it cannot differentiate exactly twice in forward mode), one
    Hessian-vector product per sample instead.
    """
    if isinstance(params, Mapping):
        lf, p, nn_, mm = loss_fn, params, n, {k: v.unsqueeze(0) for k, v in m.items()}
    else:  # a flat parameter vector: the engine wants a dict
        lf, p, nn_, mm = (lambda q, b: loss_fn(q["theta"], b)), {"theta": params}, {"theta": n}, {"theta": m[None]}
    try:
        vals = per_sample_hvp(lf, p, nn_, batch, onto=mm)[:, 0]
        return vals, "per_sample_hvp(onto) (nested forward mode on the batch)"
    except (UnsupportedOpError, NotImplementedError):
        pass

    def per_sample_block(q, *sample):  # m^T H(x_i) n
        return tree_dot(m, hvp(lambda r: one(r, *sample), q, n, op)[0])

    return map_samples(op, per_sample_block, params, samples, chunk_size)


def _combine(HO: Params, c: Tensor) -> Params:
    """sum_j c_j (H O)_j for the stacked columns ``HO`` (a ``[k, D]`` tensor or a dict of ``[k, *shape]``)."""
    if isinstance(HO, Tensor):
        return c @ HO
    return {n: torch.tensordot(c, v, dims=1) for n, v in HO.items()}


def _expand_rows(mirror: Mirror, C: Tensor, params: Params) -> Params:
    """O c for every row c of ``C`` (``[m, k]``) at once, in ``C``'s dtype, shaped like ``params``
    with a leading m: ``[m, D]`` for a flat tensor, else a dict of ``[m, *shape]`` (zeros where the
    mirror does not reach). One scatter for all rows, where ``Mirror.expand(c, like=params)`` per
    row would rebuild every parameter each time (a millisecond a row on the README MLP)."""
    flat = mirror.expand(C)  # [m, D] in the mirror's layout order
    layout = mirror.layout
    if isinstance(params, Tensor) or layout is None:
        return flat
    m, out = C.shape[0], {}
    for name, v in params.items():
        if name in layout.names:
            j = layout.index(name)
            out[name] = flat[:, layout.offsets[j]:layout.offsets[j] + layout.numels[j]].reshape(m, *v.shape)
        else:
            out[name] = flat.new_zeros(m, *v.shape)
    return out


def _columns_like(mirror: Mirror, V: Tensor, params: Params) -> Tensor:
    """O V as a ``[D, k]`` matrix in ``V``'s dtype and the flattening order of ``params`` (which
    may differ from the mirror's layout; a parameter outside it gets zeros)."""
    rows = _expand_rows(mirror, V.T, params)
    if isinstance(rows, Tensor):
        return rows.T
    return torch.cat([r.reshape(V.shape[1], -1) for r in rows.values()], 1).T


def _randn_like(params: Params, g: torch.Generator) -> Params:
    """Standard normal entries shaped like ``params``, drawn in their dtype (float32 draws are
    vectorized, float64 ones several times slower)."""
    if isinstance(params, Tensor):
        return torch.randn(params.shape, generator=g, dtype=params.dtype).to(params.device)
    return {k: torch.randn(v.shape, generator=g, dtype=v.dtype).to(v.device) for k, v in params.items()}
