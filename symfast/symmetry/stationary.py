r"""``stationary_report``: the numbers of Theorem 4 at a given point, computed exactly with ``torch.func``."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Mapping, Optional, Tuple, Union

import torch
import torch.func as tf
from torch import Tensor

from ..curvature.api import per_sample_directional_derivatives, per_sample_hvp
from ..curvature.checks import UnsupportedOpError
from ..curvature.linearization import Linearization, NoDoubleBackward
from ..curvature.per_sample import hvp, map_samples, single_sample_loss
from .layout import Params, tree_dot, tree_norm, tree_scale
from .mirror import Mirror, check_mirror_fits
from .verification import Verification, _verify, condition_rtol

__all__ = ["stationary_report", "StationaryReport"]

# Up to this many columns, |O^T g_i| and H O come from one backward per column of the kept
# linearization (about 0.9 forward+backward passes each on the README MLP); above it, |O^T g_i|
# comes from per-sample gradients, whose cost does not grow with k (about 51 passes there for a
# mirror of first-layer weights), and the block check from n_pairs products of its own.
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
        hessian_block: ``[n_pairs]``, ``|m^T H n|`` for one random unit ``m`` in ``ker O^T`` and
            ``n_pairs`` random unit ``n`` in ``im O`` (H: Hessian of the batch-mean loss; part 2:
            zero on the condition);
            ``hessian_scale``: ``|H n|``, an upper bound of ``|m^T H n|``.
        per_sample_hessian_block: ``[B, n_pairs]`` (when ``per_sample_hessian=True``).
        eigenvalues, eigenvectors, eigen_residual: the eigen-decomposition of ``O^T H O`` (``[k]``;
            eigenvectors as flat ``[D, k]`` float64 in the params' flattening order, formed on first
            access: for a small k it is as large as the model), and
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
    eigen_residual: Optional[Tensor]
    eigen_note: str
    verification: Verification
    methods: Dict[str, str]
    _eigenvectors: Any = field(default=None, repr=False, compare=False)  # a Tensor, or what makes it

    @property
    def eigenvectors(self) -> Optional[Tensor]:
        if callable(self._eigenvectors):
            self._eigenvectors = self._eigenvectors()
        return self._eigenvectors

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
      SGD cannot leave it), as the per-sample directional derivatives along the k columns of O
      (for k <= 64: from the same backward per column that gives the Hessian-vector product
      H O; for a model that has no double backward, the curvature engine's Taylor mode), or for
      k > 64 from per-sample gradients of the touched parameters (``vmap(grad)``); and
      ``|grad l(theta, x_i)|`` for scale, from the closed forms of
      :func:`symfast.curvature.grad_norms.per_sample_grad_norms` in the same forward and backward
      (linear, conv, embedding and layer-norm parameters; ``vmap`` for the others);
    * ``|m^T H n|`` for a random unit ``m in ker O^T`` and ``n_pairs`` random unit ``n in im O``
      (part 2), via Hessian-vector products (reverse over reverse: one backward per product of
      one kept linearization, see :class:`symfast.curvature.linearization.Linearization`);
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

    # ---- one forward and backward, kept: the losses, |g_i| (closed forms per layer, see
    # grad_norms), the mean gradient; then one backward per direction for H v and J v
    lin = Linearization(op, loss_fn, params, batch, chunk_size=chunk_size)
    losses, grad_norm = lin.losses, lin.grad_norms.norms
    samples = lin.samples
    dtype = losses.dtype
    methods["per_sample_grad_norm"] = _summary(lin.grad_norms.methods)
    one = single_sample_loss(loss_fn, samples)
    cond = mirror.condition(params).double().norm().item()
    tnorm = tree_norm(params).item()

    def mean_loss(p):
        return loss_fn(p, batch).mean()

    # ---- the random block-check directions: n = O c (unit c), one unit m in ker O^T for all pairs
    k = mirror.rank
    do_eigen = eigen is True or (eigen == "auto" and k <= max_eigen_rank)
    cs = torch.randn(n_pairs, k, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    # unit c: |O c| = |c|, O's columns are orthonormal
    cs = (cs / torch.linalg.vector_norm(cs, dim=1, keepdim=True)).to(dtype=dtype, device=losses.device)
    m = mirror.symmetric_solution(_randn_like(params, seed))
    mn = tree_norm(m)
    m = None if mn.item() == 0 else tree_scale(m, 1.0 / mn)  # None: im O is everything, ker O^T = {0}
    columns_path = k <= _DIRECT_MAX_RANK or do_eigen
    need_n = per_sample_hessian or not columns_path
    ns = _expand_rows(mirror, cs, params) if need_n and m is not None else None
    if ns is not None:
        ns = [ns[j] for j in range(n_pairs)] if isinstance(ns, Tensor) else \
            [{name: v[j].to(params[name].dtype) for name, v in ns.items()} for j in range(n_pairs)]

    # ---- |O^T g_i| and the Hessian-vector products. For k <= _DIRECT_MAX_RANK (or for the eigen
    # part): the k columns of O, one backward each, give both J O (|O^T g_i| is the norm of row i:
    # O is orthonormal) and H O, from which H n = (H O) c and O^T H O. Else per-sample gradients
    # (their cost does not grow with k) and one product per n.
    HO = None
    if columns_path:
        columns = _touched_columns(mirror, params, k, dtype)
        try:
            JO, HO_cols = lin.directions(columns)
            grad_condition = torch.linalg.vector_norm(JO.double(), dim=1)
            methods["per_sample_grad_condition"] = (f"J O from the {k} column backwards of one linearization "
                                                    "(double-backward trick)")
            hvp_method = f"vjp(grad) (reverse over reverse, one linearization; the {k} columns H O)"
        except NoDoubleBackward as e:
            reason = str(e).split(": ", 1)[-1]
            grad_condition, methods["per_sample_grad_condition"] = _grad_condition(
                op, loss_fn, one, params, mirror, batch, samples, chunk_size, lin)
            HO_cols, path = _hvps_forward(op, mean_loss, params, [_full(c, params) for c in columns])
            hvp_method = f"{path} (no double backward: {reason})"
        # H O per parameter as [k, numel] (the flat vector is one parameter, "theta")
        HO = {name: torch.stack([c[name].reshape(-1) for c in HO_cols]) for name in HO_cols[0]} \
            if not isinstance(params, Tensor) else {"theta": torch.stack(HO_cols)}
        hvp_method += "; the block check's H n = (H O) c"
    else:
        grad_condition, methods["per_sample_grad_condition"] = _grad_condition(
            op, loss_fn, one, params, mirror, batch, samples, chunk_size, lin)
        if m is None:
            Hns, hvp_method = [], "none needed (ker O^T = {0})"
        else:
            try:
                Hns = lin.directions(ns)[1]
                hvp_method = "vjp(grad) (reverse over reverse, one linearization)"
            except NoDoubleBackward as e:
                Hns, path = _hvps_forward(op, mean_loss, params, ns)
                hvp_method = f"{path} (no double backward: {str(e).split(': ', 1)[-1]})"
    methods["hvp"] = hvp_method
    mean_grad_condition = mirror.condition(lin.mean_grad(None if isinstance(params, Tensor) else mirror.names))
    mean_grad_condition = mean_grad_condition.double().norm().item()
    del lin  # frees the kept graph

    # ---- part 2: block check. From the columns, m^T H n = c^T (H O)^T m and |H n|^2 = c^T G c
    # with the k x k Gram matrix G = (H O)^T (H O): no parameter-sized vector per pair.
    # 0 where im O is everything (ker O^T = {0})
    blocks = torch.zeros(n_pairs, dtype=torch.float64, device=losses.device)
    scales = torch.zeros(n_pairs, dtype=torch.float64, device=losses.device)
    per_blocks = []
    if m is not None and HO is not None:
        m2 = {"theta": m} if isinstance(params, Tensor) else m
        r = sum(HO[name] @ m2[name].reshape(-1) for name in HO)
        G = sum(v @ v.T for v in HO.values())
        blocks = (cs @ r).abs().double()
        scales = ((cs @ G) * cs).sum(1).clamp_min(0).sqrt().double()
    elif m is not None:
        blocks = torch.stack([tree_dot(m, Hn).abs() for Hn in Hns]).double()
        scales = torch.stack([tree_norm(Hn) for Hn in Hns]).double()
    if m is not None and per_sample_hessian:
        for n in ns:
            vals, methods["per_sample_hessian"] = _per_sample_block(op, loss_fn, one, params, samples, batch, m, n,
                                                                    chunk_size)
            per_blocks.append(vals.abs().double())

    # ---- eigen-directions of O^T H O
    evals = evecs = resid = None
    note = ""
    if do_eigen:
        # O^T (H O) through the mirror's own (sparse) map; the rest in the parameters' dtype
        A = (mirror.condition(HO["theta"]) if isinstance(params, Tensor) else
             mirror.condition({name: HO[name].reshape(k, *params[name].shape) for name in HO},
                              batch_dims=1)).double().T
        evals, V = torch.linalg.eigh((A + A.T) / 2)
        evecs = lambda: _columns_like(mirror, V, params)  # noqa: E731  [D, k] float64, O V
        resid = _eigen_residual(columns, HO, V.to(dtype), evals.to(dtype))
        note = f"computed from {k} Hessian-vector products"
    else:
        note = f"skipped: k = {k} > max_eigen_rank = {max_eigen_rank}" if eigen == "auto" else "skipped: eigen=False"

    eps_rel = condition_rtol(dtype)
    ver = _verify(loss_fn, params, mirror, [batch], rtol=None, atol=0.0, losses=[losses], norms=(cond, tnorm))
    return StationaryReport(
        condition_norm=cond,
        theta_norm=tnorm,
        on_condition=cond <= eps_rel * max(tnorm, 1e-30) or cond == 0.0,
        grad_condition=grad_condition,
        grad_norm=grad_norm,
        mean_grad_condition=mean_grad_condition,
        hessian_block=blocks,
        hessian_scale=scales,
        per_sample_hessian_block=torch.stack(per_blocks, 1) if per_blocks else None,
        eigenvalues=evals,
        _eigenvectors=evecs,
        eigen_residual=resid,
        eigen_note=note,
        verification=ver,
        methods=methods,
    )


def _eigen_residual(columns: list, HO: Dict[str, Tensor], V: Tensor, evals: Tensor) -> Tensor:
    """``[k]`` float64 ``|H v - lambda v|`` for the eigenvectors ``v = O V`` (``columns``: the k
    columns of O on the parameters it touches, from :func:`_touched_columns`; ``HO``: per
    parameter, ``[k, numel]``). Where O is zero, ``H v`` alone counts, as the diagonal of
    ``V^T G V`` with that part's k x k Gram matrix G (a sum of squares: no cancellation); on the
    parameters O touches, the difference is formed explicitly, since there ``H v`` and
    ``lambda v`` can cancel to rounding."""
    k = V.shape[0]
    cols = {"theta": torch.stack(columns)} if isinstance(columns[0], Tensor) else \
        {n: torch.stack([c[n].reshape(-1) for c in columns]) for n in columns[0]}
    sq = torch.zeros(k, dtype=torch.float64, device=V.device)
    untouched = [v for name, v in HO.items() if name not in cols]
    if untouched:
        Gu = sum(v @ v.T for v in untouched)
        sq = sq + ((V.T @ Gu) * V.T).sum(1).double()
    for name, c in cols.items():
        X = HO[name].T @ V - (V.T @ c.to(V.dtype)).T * evals  # H v - lambda O V on this parameter
        sq = sq + X.double().square().sum(0)
    return sq.clamp_min(0).sqrt()

def _hvps_forward(op, f, params, vs):
    """``([H v for v in vs], path)`` for the scalar ``f`` at ``params``, forward over reverse
    (:func:`~symfast.curvature.per_sample.hvp`, one product per direction): the path for a model
    that cannot be differentiated twice in reverse mode."""
    out, path = [], "jvp(grad)"
    for v in vs:
        hv, path = hvp(f, params, v, op)
        out.append(hv)
    return out, path


def _touched_columns(mirror: Mirror, params: Params, k: int, dtype: torch.dtype) -> list:
    """The k columns of O, each on the parameters the mirror touches only (a dict that leaves the
    others out), or as flat vectors for a flat ``params``."""
    first = params if isinstance(params, Tensor) else next(iter(params.values()))
    eye = torch.eye(k, dtype=dtype, device=first.device)
    if isinstance(params, Tensor):
        rows = _expand_rows(mirror, eye, params)
        return [rows[j] for j in range(k)]
    sub = {n: params[n] for n in mirror.names}
    rows = _expand_rows(mirror, eye, sub)
    return [{n: v[j].to(sub[n].dtype) for n, v in rows.items()} for j in range(k)]


def _full(v: Params, params: Params) -> Params:
    """``v`` with zeros for the parameters it leaves out."""
    if isinstance(v, Tensor):
        return v
    return {n: v[n] if n in v else torch.zeros_like(p) for n, p in params.items()}


def _grad_condition(op, loss_fn, one, params, mirror, batch, samples, chunk_size, lin):
    """``[B]`` float64 ``|O^T g_i|``, and how it was computed, where the column backwards of the
    linearization ``lin`` are not taken.

    For ``k <= _DIRECT_MAX_RANK``: the per-sample directional derivatives along the k columns of O
    (:func:`symfast.per_sample_directional_derivatives`, Taylor mode: one pass of the batch for all
    k, tangents only on the parameters the mirror touches): ``|O^T g_i|`` is the norm of row i,
    since O's columns are orthonormal. For larger k, or a model the engine refuses, per-sample
    gradients of the touched parameters by vmap, a chunk at a time, reduced at once; for a batch
    that couples its samples (``lin.coupled``), the rows of the batch's Jacobian instead (a
    sample evaluated alone would have another loss).
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

    if lin.coupled:
        parts = []
        for _, grads in lin.jacobian_rows(touched, chunk_size):
            gcond = mirror.condition(grads["theta"]) if flat else mirror.condition(grads, batch_dims=1)
            parts.append(gcond.double().norm(dim=-1))
        out = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)
        return out, f"Jacobian rows of {touched} (the batch couples its samples; {why})"

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


def _randn_like(params: Params, seed: int) -> Params:
    """Standard normal entries shaped like ``params``, drawn in their dtype (float32 draws are
    vectorized, float64 ones several times slower) from a generator seeded with ``seed``."""
    if isinstance(params, Tensor):
        return _randn_draw(((params.shape, params.dtype),), seed, params.device)[0]
    draw = _randn_draw(tuple((v.shape, v.dtype) for v in params.values()), seed, next(iter(params.values())).device)
    return dict(zip(params, draw))


@functools.lru_cache(maxsize=4)
def _randn_draw(shapes: tuple, seed: int, device: torch.device) -> Tuple[Tensor, ...]:
    # the draw depends on nothing but the shapes and the seed: a report repeated on one model
    # (a training loop, a benchmark) reuses it instead of drawing a parameter-sized vector again
    # (a third of a forward+backward on the README MLP); callers only read it
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(shape, generator=g, dtype=dtype).to(device) for shape, dtype in shapes)
