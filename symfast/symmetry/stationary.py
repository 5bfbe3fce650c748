r"""``stationary_report``: the numbers of Theorem 4 at a given point, computed exactly with ``torch.func``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Mapping, Optional, Union

import torch
import torch.func as tf
from torch import Tensor

from ..curvature.api import per_sample_hvp
from ..curvature.checks import UnsupportedOpError
from ..curvature.per_sample import hvp, map_samples, per_sample_losses, single_sample_loss
from .layout import Params, flat_values, tree_dot, tree_norm, tree_randn_like, tree_scale
from .mirror import Mirror, check_mirror_fits
from .verification import Verification, condition_rtol, verify

__all__ = ["stationary_report", "StationaryReport"]


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
        methods: how each quantity was computed (vmap or loop; jvp or vjp of grad).
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
    * per-sample ``|O^T grad l(theta, x_i)|`` via ``vmap(grad)`` (part 1: zero on the condition,
      for every sample: SGD cannot leave it);
    * ``|m^T H n|`` for ``m in ker O^T``, ``n in im O`` (part 2), via Hessian-vector products
      (``jvp`` of ``grad``);
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
        chunk_size: samples per vmap chunk. The per-sample gradients are reduced to
            ``|O^T g_i|`` and ``|g_i|`` chunk by chunk: at most ``[chunk, D]`` exists at a time.
    """
    op = "stationary_report"
    check_mirror_fits(op, mirror, params)
    if n_pairs < 1:
        raise ValueError(f"{op}: n_pairs must be >= 1, got {n_pairs}")
    if eigen not in (True, False, "auto"):
        raise ValueError(f"{op}: eigen must be True, False or 'auto', got {eigen!r}")
    losses, samples = per_sample_losses(op, loss_fn, params, batch)
    B = samples.size
    params = {k: v.detach() for k, v in params.items()} if isinstance(params, Mapping) else params.detach()
    methods: Dict[str, str] = {}
    dtype = losses.dtype

    # ---- part 1: per-sample gradients a chunk at a time, reduced to |O^T g_i| and |g_i| at once
    # (never the [B, D] matrix: its copies and float64 conversions cost more than the gradients)
    one = single_sample_loss(loss_fn, samples)
    gcond_parts, gnorm_parts, paths = [], [], []
    for part in samples.chunks(chunk_size):
        grads, path = map_samples(op, tf.grad(one), params, part)
        paths.append(path)
        gcond = mirror.condition(grads, batch_dims=1) if isinstance(grads, Mapping) else mirror.condition(grads)
        gcond_parts.append(gcond.double().norm(dim=-1))
        leaves = list(grads.values()) if isinstance(grads, Mapping) else [grads]
        # norms in the gradients' dtype (a cast of the whole chunk to float64 costs more than the gradients)
        sq = sum(torch.linalg.vector_norm(v.reshape(part.size, -1), dim=1).double() ** 2 for v in leaves)
        gnorm_parts.append(sq.sqrt())
        del grads, leaves
    methods["per_sample_grad"] = next((p for p in paths if p != "vmap"), "vmap")
    grad_condition, grad_norm = torch.cat(gcond_parts), torch.cat(gnorm_parts)
    cond = mirror.condition(params).double().norm().item()
    tnorm = flat_values(params).double().norm().item()

    def mean_loss(p):
        return loss_fn(p, batch).mean()

    mean_grad = tf.grad(mean_loss)(params)
    mean_grad_condition = mirror.condition(mean_grad).double().norm().item()

    # ---- part 2: block check
    g = torch.Generator().manual_seed(seed)
    blocks, scales, per_blocks = [], [], []
    pairs = []  # (m, n) per pair, drawn in a fixed order from the seeded generator
    for _ in range(n_pairs):
        z = torch.randn(mirror.rank, generator=g, dtype=torch.float64)
        n = mirror.expand(z.to(dtype), like=params)
        n = tree_scale(n, 1.0 / tree_norm(n))
        m = mirror.symmetric_solution(tree_randn_like(params, g))
        mn = tree_norm(m)
        pairs.append(None if mn.item() == 0 else (tree_scale(m, 1.0 / mn), n))  # None: ker O^T = {0}
    live = [p for p in pairs if p is not None]
    Hns, hvp_method = _hvps(op, mean_loss, params, [n for _, n in live], chunk_size) if live else ([], "")
    Hn_of = iter(Hns)
    for pair in pairs:
        if pair is None:  # im O is everything: ker O^T = {0}
            blocks.append(torch.zeros((), dtype=torch.float64))
            scales.append(torch.zeros((), dtype=torch.float64))
            continue
        m, n = pair
        Hn = next(Hn_of)
        blocks.append(tree_dot(m, Hn).abs().double())
        scales.append(tree_norm(Hn).double())
        if per_sample_hessian:
            vals, methods["per_sample_hessian"] = _per_sample_block(op, loss_fn, one, params, samples, batch, m, n,
                                                                    chunk_size)
            per_blocks.append(vals.abs().double())
    methods["hvp"] = hvp_method or "none needed for the block check (ker O^T = {0})"

    # ---- eigen-directions of O^T H O
    k = mirror.rank
    do_eigen = eigen is True or (eigen == "auto" and k <= max_eigen_rank)
    evals = evecs = resid = None
    note = ""
    if do_eigen:
        HO, methods["eigen_hvp"] = _hvp_columns(op, mean_loss, params, mirror, dtype, chunk_size)  # [D, k]
        Ob = mirror.basis.double() if isinstance(params, Tensor) else _basis_like(mirror, params)
        A = Ob.T @ HO
        evals, V = torch.linalg.eigh((A + A.T) / 2)
        evecs = Ob @ V
        resid = (HO @ V - evecs * evals).norm(dim=0)
        note = f"computed from {k} Hessian-vector products"
    else:
        note = f"skipped: k = {k} > max_eigen_rank = {max_eigen_rank}" if eigen == "auto" else "skipped: eigen=False"

    eps_rel = condition_rtol(dtype)
    ver = verify(loss_fn, params, mirror, [batch])
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


def _hvps(op, f, params, vs, chunk_size):
    """``[H v for v in vs]`` for the scalar ``f`` at ``params``, and the path of :func:`hvp`.

    The products are vmapped over the directions, ``chunk_size`` at a time (one batched pass per
    chunk instead of one pass per direction); where vmap cannot batch the model, one at a time.
    """
    try:
        out = []
        step = len(vs) if chunk_size is None else chunk_size
        for s in range(0, len(vs), step):
            part = vs[s:s + step]
            if isinstance(params, Tensor):
                hv = tf.vmap(lambda v: tf.jvp(tf.grad(f), (params,), (v,))[1])(torch.stack(part))
                out += list(hv.unbind(0))
            else:
                stacked = {name: torch.stack([v[name] for v in part]) for name in params}
                hv = tf.vmap(lambda v: tf.jvp(tf.grad(f), (params,), (v,))[1])(stacked)
                out += [{name: hv[name][i] for name in params} for i in range(len(part))]
        return out, "jvp(grad)"
    except (RuntimeError, NotImplementedError):
        pass  # an op vmap or forward mode cannot batch: hvp below takes its own exact path
    out, path = [], ""
    for v in vs:
        hv, path = hvp(f, params, v, op)
        out.append(hv)
    return out, path


def _hvp_columns(op, mean_loss, params, mirror, dtype, chunk_size):
    """H O as a float64 ``[D, k]`` matrix (k Hessian-vector products, see :func:`_hvps`), and the path."""
    eye = torch.eye(mirror.rank, dtype=dtype)
    cols, path = _hvps(op, mean_loss, params, [mirror.expand(eye[j], like=params) for j in range(mirror.rank)],
                       chunk_size)
    return torch.stack([flat_values(c).double() for c in cols], 1), path


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


def _basis_like(mirror: Mirror, params: Mapping[str, Tensor]) -> Tensor:
    """O as dense [D, k] in the flattening order of ``params`` (which may differ from the mirror's layout)."""
    k = mirror.rank
    cols = [flat_values(mirror.expand(torch.eye(k, dtype=torch.float64)[j], like={n: v.double() for n, v in params.items()}))
            for j in range(k)]
    return torch.stack(cols, 1)
