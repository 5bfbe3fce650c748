r"""Mirror symmetries of a loss, their stationary conditions, and their discovery in models.

The paper's Definition 2: a loss :math:`\ell_0(\theta, x)` has the *O-mirror symmetry* when

.. math:: \ell_0(\theta, x) = \ell_0(R\theta, x), \qquad R = I - 2OO^\top, \quad O^\top O = I,

for every sample :math:`x`. Theorem 4 then says, for the loss with weight decay
:math:`\ell_\gamma = \ell_0 + \gamma\|\theta\|^2`:

1. if :math:`O^\top\theta = 0` then :math:`O^\top\nabla_\theta\ell_\gamma(\theta, x) = 0` for every
   :math:`x`: the *stationary condition* :math:`O^\top\theta = 0` is never left by GD or SGD;
2. at such a point the Hessian has no block between :math:`\ker O^\top` and :math:`\operatorname{im} O`:
   :math:`m^\top H n = 0` for :math:`m \in \ker O^\top`, :math:`n \in \operatorname{im} O`, so a set of
   its eigenvectors spans :math:`\operatorname{im} O`.

This module provides

* :class:`Mirror`, the object ``O`` (dense, from orthonormal columns or a projection, or sparse,
  from the constructors below), acting on flat parameter vectors and on dicts of parameter
  tensors;
* one constructor per symmetry of §2-3 (the corollaries of Theorem 4):
  :func:`rescaling_mirror` (Theorem 1), :func:`permutation_mirror` (eq. 5, Theorem 3),
  :func:`rotation_mirror` and :func:`double_rotation_mirror` (Theorem 2 and the double rotation),
  the hidden-unit conveniences :func:`unit_permutation_mirror` and :func:`unit_sign_mirror`, and
  :func:`dcs_mirrors` for modules whose weight is a DCS factorization;
* :func:`verify`, a numerical check of :math:`\ell(\theta, x) = \ell(R\theta, x)`;
* :func:`find_symmetries`, which proposes the mirrors of a model from its structure and reports
  only those that pass a numerical check, together with every check it made;
* :func:`stationary_report`, the numbers of Theorem 4 at a given point, computed exactly with
  ``torch.func``.

**Flattening order.** A dict of parameters is flattened by concatenating ``p.reshape(-1)`` in the
dict's insertion order (for a module: ``model.named_parameters()`` order), see :func:`flatten`.
A mirror built from a dict or a module remembers that layout: a flat vector given to it must
follow the same order. When a dict is given, tensors are found by name, so the dict's own order
does not matter, and entries the mirror does not know are passed through unchanged (the mirror
acts as the identity on them).

**Per-sample losses.** ``loss_fn(params, batch)`` returns the per-sample losses, shape ``[B]``.
``batch`` is any pytree (tensor, tuple, dict); every tensor in it whose leading dimension is ``B``
is split per sample, other leaves are shared by all samples.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.func as tf
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_unflatten

__all__ = [
    "Mirror",
    "ParamLayout",
    "flatten",
    "unflatten",
    "rescaling_mirror",
    "permutation_mirror",
    "rotation_mirror",
    "double_rotation_mirror",
    "unit_permutation_mirror",
    "unit_sign_mirror",
    "dcs_mirrors",
    "ModuleMirror",
    "verify",
    "Verification",
    "find_symmetries",
    "SymmetryReport",
    "SymmetryFinding",
    "SymmetryCheck",
    "stationary_report",
    "StationaryReport",
]

Params = Union[Mapping[str, Tensor], Tensor]


# =============================================================================== layouts
@dataclass(frozen=True)
class ParamLayout:
    """Names and shapes of a set of parameters, and where each sits in the flat vector.

    The flat vector is ``torch.cat([p.reshape(-1) for p in params.values()])``, in this order.
    """

    names: Tuple[str, ...]
    shapes: Tuple[torch.Size, ...]

    @property
    def numels(self) -> Tuple[int, ...]:
        return tuple(math.prod(s) for s in self.shapes)

    @property
    def offsets(self) -> Tuple[int, ...]:
        return tuple(itertools.accumulate((0,) + self.numels[:-1])) if self.names else ()

    @property
    def numel(self) -> int:
        return sum(self.numels)

    def index(self, name: str) -> int:
        try:
            return self.names.index(name)
        except ValueError:
            raise KeyError(name) from None

    def shape_of(self, name: str) -> torch.Size:
        return self.shapes[self.index(name)]

    @staticmethod
    def of(params: Union[Mapping[str, Tensor], nn.Module, "ParamLayout"]) -> "ParamLayout":
        if isinstance(params, ParamLayout):
            return params
        if isinstance(params, nn.Module):
            params = dict(params.named_parameters())
        if not isinstance(params, Mapping):
            raise TypeError(f"params must be a dict of tensors or an nn.Module, got {type(params).__name__}")
        for k, v in params.items():
            if not isinstance(v, Tensor):
                raise TypeError(f"params[{k!r}] must be a tensor, got {type(v).__name__}")
        return ParamLayout(tuple(params), tuple(v.shape for v in params.values()))


def _named_values(params: Union[Mapping[str, Tensor], nn.Module]) -> Dict[str, Tensor]:
    if isinstance(params, nn.Module):
        return dict(params.named_parameters())
    return dict(params)


def flatten(params: Union[Mapping[str, Tensor], nn.Module]) -> Tensor:
    """Concatenates ``p.reshape(-1)`` over a dict of tensors (insertion order) or a module's
    ``named_parameters()``. This is the flat order every mirror built from ``params`` uses."""
    values = _named_values(params)
    if not values:
        return torch.zeros(0)
    return torch.cat([v.reshape(-1) for v in values.values()])


def unflatten(vector: Tensor, like: Union[Mapping[str, Tensor], nn.Module, ParamLayout]) -> Dict[str, Tensor]:
    """Inverse of :func:`flatten`: splits ``vector`` (shape ``[D]``) into a dict shaped like ``like``."""
    layout = ParamLayout.of(like)
    if vector.dim() != 1 or vector.shape[0] != layout.numel:
        raise ValueError(f"unflatten: vector must have shape ({layout.numel},), got {tuple(vector.shape)}")
    return {n: c.view(s) for n, s, c in zip(layout.names, layout.shapes, vector.split(list(layout.numels)))}


def _default_atol(dtype: torch.dtype) -> float:
    return math.sqrt(torch.finfo(dtype).eps) if dtype.is_floating_point else 1e-6


# =============================================================================== Mirror
class Mirror:
    r"""An O-mirror: :math:`O \in \mathbb{R}^{D \times k}` with orthonormal columns.

    ``R = I - 2 O O^T`` is the reflection, ``P = O O^T`` the projection onto the mirror's image,
    ``O^T theta = 0`` the stationary condition and ``(I - O O^T) theta`` the symmetric solution
    (the fixed point of ``R`` closest to ``theta``).

    Args:
        O: ``[D, k]`` (or ``[D]`` for one unit vector ``n``) with orthonormal columns. Checked:
            a ``ValueError`` names ``O`` and the measured ``max |O^T O - I|`` when it exceeds
            ``atol`` (default ``sqrt(eps)`` of O's dtype: 3.5e-4 for float32, 1.5e-8 for float64).
        params: optional dict of tensors, module or :class:`ParamLayout` whose flattened size is
            ``D``; with it the mirror also accepts dicts of parameter tensors.
        atol: tolerance of the orthonormality check.
        description: free text carried in ``repr``.

    Every method accepts either a flat tensor of shape ``[..., D]`` (leading batch dims allowed)
    or, when the mirror knows parameter names, a dict of tensors; the result has the same form.

    The constructors in this module build sparse mirrors (each column of ``O`` touches only the
    coordinates of the symmetry), so they scale to real models; :attr:`basis` and
    :attr:`projection` materialize the dense matrices and are meant for small ``D``.
    """

    # ---- construction
    def __init__(
        self,
        O: Tensor,
        *,
        params: Union[Mapping[str, Tensor], nn.Module, ParamLayout, None] = None,
        atol: Optional[float] = None,
        description: str = "",
    ) -> None:
        if not isinstance(O, Tensor):
            raise TypeError(f"Mirror: O must be a torch.Tensor of shape (D, k), got {type(O).__name__}")
        if not O.is_floating_point():
            raise TypeError(f"Mirror: O must be a floating tensor, got {O.dtype}")
        if O.dim() == 1:
            O = O[:, None]
        if O.dim() != 2:
            raise ValueError(f"Mirror: O must have shape (D, k) or (D,), got {tuple(O.shape)}")
        D, k = O.shape
        if k == 0 or k > D:
            raise ValueError(f"Mirror: O must have 1 <= k <= D orthonormal columns, got shape {tuple(O.shape)}")
        tol = _default_atol(O.dtype) if atol is None else float(atol)
        O64 = O.detach().to(torch.float64)
        err = (O64.T @ O64 - torch.eye(k, dtype=torch.float64, device=O.device)).abs().max().item()
        if not err <= tol:
            raise ValueError(
                f"Mirror: O must have orthonormal columns (O^T O = I); got max |O^T O - I| = {err:.3g} "
                f"> atol = {tol:.3g} for O of shape {tuple(O.shape)}"
            )
        layout = None if params is None else ParamLayout.of(params)
        if layout is not None and layout.numel != D:
            raise ValueError(
                f"Mirror: O has {D} rows but params has {layout.numel} entries in total (names {list(layout.names)}); "
                "O must have one row per entry of the flattened params"
            )
        self._setup(layout, dense=O.detach(), index=None, coef=None, description=description, kind="dense")

    @classmethod
    def from_projection(
        cls,
        P: Tensor,
        *,
        params: Union[Mapping[str, Tensor], nn.Module, ParamLayout, None] = None,
        atol: Optional[float] = None,
        description: str = "",
    ) -> "Mirror":
        """The mirror of a projection ``P = O O^T`` (checked symmetric and idempotent).

        ``O`` is taken as the eigenvectors of ``P`` with eigenvalue 1 (``torch.linalg.eigh``).
        """
        if not isinstance(P, Tensor) or not P.is_floating_point():
            raise TypeError(f"Mirror.from_projection: P must be a floating torch.Tensor, got {type(P).__name__}")
        if P.dim() != 2 or P.shape[0] != P.shape[1]:
            raise ValueError(f"Mirror.from_projection: P must be a square matrix (D, D), got {tuple(P.shape)}")
        tol = _default_atol(P.dtype) if atol is None else float(atol)
        P64 = P.detach().to(torch.float64)
        asym = (P64 - P64.T).abs().max().item() if P.numel() else 0.0
        idem = (P64 @ P64 - P64).abs().max().item() if P.numel() else 0.0
        if not (asym <= tol and idem <= tol):
            raise ValueError(
                "Mirror.from_projection: P must be an orthogonal projection (P = P^T and P @ P = P); got "
                f"max |P - P^T| = {asym:.3g} and max |P @ P - P| = {idem:.3g} (atol = {tol:.3g})"
            )
        evals, evecs = torch.linalg.eigh((P64 + P64.T) / 2)
        O = evecs[:, evals > 0.5]
        if O.shape[1] == 0:
            raise ValueError("Mirror.from_projection: P is the zero projection; a mirror needs rank >= 1")
        return cls(O.to(P.dtype), params=params, atol=atol, description=description)

    @classmethod
    def _sparse(
        cls,
        layout: ParamLayout,
        index: Tensor,
        coef: Tensor,
        *,
        kind: str,
        description: str,
        op: str,
        atol: float = 1e-8,
    ) -> "Mirror":
        """O with columns ``O[:, j] = v_j / |v_j|``, ``v_j = sum_s coef[j, s] e_{index[j, s]}`` (flat
        coordinates of ``layout``).

        The constructors build O orthonormal by design; it is still checked, with random probes
        ``|O^T O z - z| / |z|`` (zero for every z exactly when O^T O = I).
        """
        self = cls.__new__(cls)
        self._setup(layout, dense=None, index=index, coef=coef.to(torch.float64), description=description, kind=kind)
        g = torch.Generator().manual_seed(0)
        z = torch.randn(2, self.rank, generator=g, dtype=torch.float64)
        back = self._ct(self._o(z))
        err = ((back - z).norm(dim=-1) / z.norm(dim=-1)).max().item()
        if not err <= atol:
            raise ValueError(
                f"{op}: the groups give a non-orthonormal O (|O^T O z - z| / |z| = {err:.3g}); "
                "the groups must not overlap"
            )
        return self

    def _setup(self, layout, dense, index, coef, description, kind) -> None:
        self.description = description
        self.kind = kind
        self._flat_only = layout is None or layout.names == ("<flat>",)
        D = dense.shape[0] if dense is not None else None
        self._layout = layout if layout is not None else ParamLayout(("<flat>",), (torch.Size([D]),))
        if dense is not None:
            self._dense = dense
            self._index = None
            self._coef = None
            self._touched = tuple(range(len(self._layout.names)))
            self._k = dense.shape[1]
            return
        self._dense = None
        # Index into the concatenation of the touched parameters only ("compact" coordinates),
        # so applying a mirror to a dict never copies the parameters it does not touch.
        offsets = torch.tensor(self._layout.offsets + (self._layout.numel,))
        owner = torch.searchsorted(offsets, index, right=True) - 1
        touched = torch.bincount(owner.reshape(-1), minlength=len(self._layout.names)).nonzero().reshape(-1).tolist()
        compact_off = torch.zeros(len(self._layout.names), dtype=torch.long)
        acc = 0
        for t in touched:
            compact_off[t] = acc
            acc += self._layout.numels[t]
        self._touched = tuple(touched)
        self._index = (index - offsets[owner] + compact_off[owner]).contiguous()
        self._coef = coef.contiguous()
        self._sq = coef.pow(2).sum(-1)
        self._k = index.shape[0]
        self._cache: Dict[Tuple[torch.dtype, torch.device], Tuple[Tensor, Tensor]] = {}

    # ---- properties
    @property
    def dim(self) -> int:
        """D, the size of the flat parameter vector."""
        return self._layout.numel

    @property
    def rank(self) -> int:
        """k, the number of columns of O (the number of constraints in ``O^T theta = 0``)."""
        return self._k

    @property
    def layout(self) -> Optional[ParamLayout]:
        """The parameter layout (names, shapes, flat order), or None for a flat-vector mirror."""
        return None if self._flat_only else self._layout

    @property
    def names(self) -> Tuple[str, ...]:
        """Names of the parameters the mirror touches (empty for a flat-vector mirror)."""
        return () if self._flat_only else tuple(self._layout.names[t] for t in self._touched)

    @property
    def basis(self) -> Tensor:
        """O as a dense ``[D, k]`` tensor (flat layout order). Materializes D*k numbers."""
        eye = torch.eye(self.rank, dtype=self._dtype(), device=self._device())
        return self._scatter_full(self._o(eye)).T.contiguous()

    @property
    def projection(self) -> Tensor:
        """P = O O^T as a dense ``[D, D]`` tensor. Materializes D*D numbers: use :meth:`project` on
        large models."""
        if self.dim > 20000:
            raise ValueError(
                f"Mirror.projection: D = {self.dim} would materialize a {self.dim}x{self.dim} matrix; "
                "use mirror.project(theta) (= O O^T theta) instead"
            )
        B = self.basis
        return B @ B.T

    def _dtype(self) -> torch.dtype:
        return self._dense.dtype if self._dense is not None else torch.float64

    def _device(self) -> torch.device:
        return self._dense.device if self._dense is not None else self._index.device

    def __repr__(self) -> str:
        where = "flat" if self._flat_only else ", ".join(self.names[:4]) + (", ..." if len(self.names) > 4 else "")
        desc = f", {self.description!r}" if self.description else ""
        return f"Mirror(kind={self.kind!r}, D={self.dim}, k={self.rank}, touches=[{where}]{desc})"

    # ---- the linear maps on compact coordinates ([..., n] <-> [..., k])
    def _operands(self, like: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        key = (like.dtype, like.device)
        if key not in self._cache:
            self._cache[key] = (self._index.to(like.device), self._coef.to(device=like.device, dtype=like.dtype),
                                self._sq.to(device=like.device, dtype=like.dtype))
        return self._cache[key]

    # Sparse columns are stored unnormalized, O[:, j] = v_j / |v_j| (v_j = (1, -1) for a swap), so
    # O O^T x = sum_j v_j (v_j . x) / |v_j|^2 involves no rounded 1/sqrt(2): swaps are exact.
    def _ct(self, x: Tensor) -> Tensor:
        """O^T x for compact x of shape [..., n]."""
        if self._dense is not None:
            return x @ self._dense.to(device=x.device, dtype=x.dtype)
        index, coef, sq = self._operands(x)
        return (x[..., index] * coef).sum(-1) / sq.sqrt()

    def _o(self, c: Tensor) -> Tensor:
        """O c for c of shape [..., k], in compact coordinates."""
        if self._dense is not None:
            return c @ self._dense.to(device=c.device, dtype=c.dtype).T
        index, coef, sq = self._operands(c)
        return self._scatter_cols(c / sq.sqrt(), index, coef)

    def _p(self, x: Tensor) -> Tensor:
        """O O^T x for compact x."""
        if self._dense is not None:
            return self._o(self._ct(x))
        index, coef, sq = self._operands(x)
        return self._scatter_cols((x[..., index] * coef).sum(-1) / sq, index, coef)

    def _scatter_cols(self, c: Tensor, index: Tensor, coef: Tensor) -> Tensor:
        n = sum(self._layout.numels[t] for t in self._touched)
        src = (c[..., :, None] * coef).reshape(*c.shape[:-1], -1)
        return c.new_zeros(*c.shape[:-1], n).index_add(-1, index.reshape(-1), src)

    def _scatter_full(self, compact: Tensor) -> Tensor:
        """Compact [..., n] -> full flat [..., D] (zeros on untouched parameters)."""
        if len(self._touched) == len(self._layout.names):
            return compact
        pieces, it = [], iter(compact.split([self._layout.numels[t] for t in self._touched], dim=-1))
        touched = set(self._touched)
        for t, n in enumerate(self._layout.numels):
            pieces.append(next(it) if t in touched else compact.new_zeros(*compact.shape[:-1], n))
        return torch.cat(pieces, dim=-1)

    # ---- input handling
    def _split_input(self, theta: Params, op: str, batch_dims: int = 0):
        """Returns (compact tensor [..., n], rebuild) where rebuild(delta_compact) = theta + delta."""
        if isinstance(theta, Mapping):
            if self._flat_only:
                raise TypeError(
                    f"Mirror.{op}: this mirror was built from a flat O without parameter names; theta must be "
                    f"a tensor of shape (..., {self.dim}), got a dict (pass params=... when building the mirror)"
                )
            pieces = []
            for t in self._touched:
                name, shape = self._layout.names[t], self._layout.shapes[t]
                if name not in theta:
                    raise KeyError(
                        f"Mirror.{op}: theta is missing parameter {name!r} (expected shape {tuple(shape)}); "
                        f"got keys {list(theta)[:8]}{'...' if len(theta) > 8 else ''}"
                    )
                v = theta[name]
                if not isinstance(v, Tensor) or tuple(v.shape[batch_dims:]) != tuple(shape) or v.dim() != len(shape) + batch_dims:
                    got = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
                    raise ValueError(
                        f"Mirror.{op}: theta[{name!r}] must have shape {(('...',) * batch_dims) + tuple(shape)}, got {got}"
                    )
                pieces.append(v.reshape(*v.shape[:batch_dims], -1))
            compact = torch.cat(pieces, dim=-1)

            def rebuild(new: Tensor) -> Dict[str, Tensor]:
                out = dict(theta)
                chunks = new.split([self._layout.numels[t] for t in self._touched], dim=-1)
                for t, c in zip(self._touched, chunks):
                    name = self._layout.names[t]
                    out[name] = c.reshape(theta[name].shape).to(theta[name].dtype)
                return out

            return compact, rebuild
        if not isinstance(theta, Tensor):
            raise TypeError(f"Mirror.{op}: theta must be a tensor or a dict of tensors, got {type(theta).__name__}")
        if theta.dim() < 1 or theta.shape[-1] != self.dim:
            raise ValueError(
                f"Mirror.{op}: theta must have shape (..., {self.dim}) (D, the mirror's dimension), got {tuple(theta.shape)}"
            )
        if len(self._touched) == len(self._layout.names):
            return theta, (lambda new: new.to(theta.dtype))
        offs, numels = self._layout.offsets, self._layout.numels
        touched = set(self._touched)
        compact = torch.cat([theta[..., offs[t]:offs[t] + numels[t]] for t in self._touched], dim=-1)

        def rebuild_flat(new: Tensor) -> Tensor:
            it = iter(new.to(theta.dtype).split([numels[t] for t in self._touched], dim=-1))
            return torch.cat([next(it) if t in touched else theta[..., offs[t]:offs[t] + numels[t]]
                              for t in range(len(numels))], dim=-1)

        return compact, rebuild_flat

    # ---- public maps
    # The maps run in float64 for lower-precision inputs and round once at the end, so that, e.g.,
    # a permutation mirror swaps float32 entries exactly (the coefficients are +-1/sqrt(2)).
    @staticmethod
    def _work(x: Tensor) -> Tensor:
        if x.is_floating_point() and x.dtype != torch.float64 and x.device.type != "mps":
            return x.to(torch.float64)
        return x

    def condition(self, theta: Params, *, batch_dims: int = 0) -> Tensor:
        """O^T theta, shape ``[..., k]``: zero exactly on the stationary condition.

        ``batch_dims`` is the number of leading batch dims of each tensor when theta is a dict
        (for a flat tensor every dim but the last is a batch dim)."""
        compact, _ = self._split_input(theta, "condition", batch_dims)
        return self._ct(self._work(compact)).to(compact.dtype)

    def project(self, theta: Params) -> Params:
        """O O^T theta (the component that the reflection flips; zero on untouched parameters)."""
        compact, _ = self._split_input(theta, "project")
        p = self._p(self._work(compact))
        if isinstance(theta, Mapping):
            _, rebuild = self._split_input({k: torch.zeros_like(v) for k, v in theta.items()}, "project")
            return rebuild(p)
        return self._scatter_full(p).to(compact.dtype)

    def symmetric_solution(self, theta: Params) -> Params:
        """(I - O O^T) theta: the fixed point of the reflection closest to theta."""
        compact, rebuild = self._split_input(theta, "symmetric_solution")
        x = self._work(compact)
        return rebuild(x - self._p(x))

    def reflect(self, theta: Params) -> Params:
        """R theta = (I - 2 O O^T) theta."""
        compact, rebuild = self._split_input(theta, "reflect")
        x = self._work(compact)
        return rebuild(x - 2 * self._p(x))

    def expand(self, c: Tensor, *, like: Optional[Params] = None) -> Params:
        """O c for coefficients ``c`` of shape ``[..., k]``: a flat ``[..., D]`` tensor, or a dict
        shaped like ``like`` (with its dtypes; zeros on parameters the mirror does not touch)."""
        if not isinstance(c, Tensor) or c.shape[-1:] != (self.rank,):
            raise ValueError(f"Mirror.expand: c must be a tensor of shape (..., {self.rank}) (k), got {tuple(getattr(c, 'shape', ()))}")
        if isinstance(like, Tensor):
            c = c.to(like.device)
        elif isinstance(like, Mapping) and like:
            c = c.to(next(iter(like.values())).device)
        full = self._o(c)
        if like is None or isinstance(like, Tensor):
            return self._scatter_full(full)
        zero = {k: torch.zeros_like(v) for k, v in like.items()}
        _, rebuild = self._split_input(zero, "expand")
        return rebuild(full)

    def with_layout(self, params: Union[Mapping[str, Tensor], nn.Module, ParamLayout]) -> "Mirror":
        """The same mirror on a larger parameter layout (e.g. a module's mirror on the whole model)
        that contains every parameter this mirror touches, with the same shapes."""
        layout = ParamLayout.of(params)
        if self._flat_only:
            raise TypeError("Mirror.with_layout: a flat-vector mirror has no parameter names to place")
        for t in self._touched:
            name, shape = self._layout.names[t], self._layout.shapes[t]
            if name not in layout.names or layout.shape_of(name) != shape:
                got = tuple(layout.shape_of(name)) if name in layout.names else "missing"
                raise ValueError(f"Mirror.with_layout: params[{name!r}] must have shape {tuple(shape)}, got {got}")
        if self._dense is not None:
            full = self.basis
            new = torch.zeros(layout.numel, self.rank, dtype=full.dtype, device=full.device)
            for t, (off, n) in enumerate(zip(self._layout.offsets, self._layout.numels)):
                j = layout.index(self._layout.names[t])
                new[layout.offsets[j]:layout.offsets[j] + n] = full[off:off + n]
            return Mirror(new, params=layout, description=self.description)
        # compact -> new full coordinates
        old_compact_starts, acc = [], 0
        for t in self._touched:
            old_compact_starts.append(acc)
            acc += self._layout.numels[t]
        starts = torch.tensor(old_compact_starts + [acc])
        piece = torch.searchsorted(starts, self._index, right=True) - 1
        new_off = torch.tensor([layout.offsets[layout.index(self._layout.names[t])] for t in self._touched])
        full_index = self._index - starts[piece] + new_off[piece]
        out = Mirror.__new__(Mirror)
        out._setup(layout, dense=None, index=full_index, coef=self._coef, description=self.description, kind=self.kind)
        return out


# =============================================================================== groups
GroupSpec = Union[str, Tuple[str, Any], Tensor, slice, Sequence[Any]]


def _layout_arg(params: Any, op: str) -> ParamLayout:
    if isinstance(params, int):
        return ParamLayout(("<flat>",), (torch.Size([params]),))
    try:
        return ParamLayout.of(params)
    except TypeError as e:
        raise TypeError(f"{op}: params must be a dict of tensors, an nn.Module, a ParamLayout or an int D; {e}") from None


def _positions(layout: ParamLayout, spec: GroupSpec, op: str, arg: str) -> Tensor:
    """Flat positions (in layout order) of the entries a group spec selects.

    A group is: a parameter name (all its entries); ``(name, index)`` (the entries ``p[index]``,
    index being anything tensor indexing accepts); a list of groups (concatenated); or, for
    flat mirrors, a LongTensor of flat positions or a slice.
    """
    if isinstance(spec, str):
        return _positions(layout, (spec, slice(None)), op, arg)
    if isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[0], str):
        name, index = spec
        if name not in layout.names:
            raise KeyError(f"{op}: {arg} names parameter {name!r}, which is not in params (have {list(layout.names)[:8]})")
        t = layout.index(name)
        grid = torch.arange(layout.numels[t]).view(layout.shapes[t])
        try:
            sel = grid[index]
        except (IndexError, TypeError) as e:
            raise IndexError(
                f"{op}: {arg} = {spec!r} does not index parameter {name!r} of shape {tuple(layout.shapes[t])}: {e}"
            ) from None
        return sel.reshape(-1) + layout.offsets[t]
    if isinstance(spec, slice):
        return torch.arange(layout.numel)[spec]
    if isinstance(spec, Tensor):
        if spec.dtype == torch.bool:
            if spec.shape != (layout.numel,):
                raise ValueError(f"{op}: {arg} as a bool mask must have shape ({layout.numel},), got {tuple(spec.shape)}")
            return spec.nonzero().reshape(-1)
        if spec.dtype not in (torch.long, torch.int32, torch.int64):
            raise TypeError(f"{op}: {arg} as a tensor must hold integer flat positions, got {spec.dtype}")
        spec = spec.reshape(-1).long()
        if spec.numel() and (spec.min() < 0 or spec.max() >= layout.numel):
            raise IndexError(f"{op}: {arg} has flat positions outside [0, {layout.numel})")
        return spec
    if isinstance(spec, (list, tuple)):
        parts = [_positions(layout, s, op, arg) for s in spec]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)
    raise TypeError(f"{op}: {arg} must be a name, (name, index), a list of those or flat positions, got {type(spec).__name__}")


def _disjoint(op: str, *groups: Tuple[str, Tensor]) -> None:
    allpos = torch.cat([g for _, g in groups])
    if allpos.numel() and torch.bincount(allpos).max().item() > 1:
        names = " and ".join(n for n, _ in groups)
        raise ValueError(f"{op}: {names} must select distinct entries (no entry twice), but they overlap")




# =============================================================================== constructors
def rescaling_mirror(params: Any, a: GroupSpec, b: GroupSpec, *, kind: str = "sign") -> Mirror:
    r"""The mirrors of a rescaling symmetry :math:`\ell(\rho a, b/\rho) = \ell(a, b)` (Theorem 1, eq. 2).

    Following the paper's corollary of Theorem 4:

    * ``kind="sign"`` (any sizes): ``O = I`` on the entries of ``a`` and ``b``, so ``R`` flips
      the signs of both groups (the case rho = -1). Stationary condition: ``a = 0`` and ``b = 0``.
    * For scalar pairs, e.g. every coordinate of the Hadamard/DCS factorization ``theta = w * u``
      where ``l`` depends on ``a_i * b_i`` only, each pair ``(a_i, b_i)`` has two mirror planes:

      * ``kind="swap"``: ``n_2 = (1, -1)/sqrt(2)`` per pair, ``R: (a_i, b_i) -> (b_i, a_i)``;
        stationary condition ``a = b``;
      * ``kind="antiswap"``: ``n_1 = (1, 1)/sqrt(2)`` per pair, ``R: (a_i, b_i) -> (-b_i, -a_i)``
        (for ``theta = w * u``: ``w -> -u``, ``u -> -w``); stationary condition ``a = -b``.

      Together they give the condition ``a = b = 0`` of ``kind="sign"``. ``a`` and ``b`` must
      select the same number of entries, paired in order.

    Args:
        params: dict of tensors / module / :class:`ParamLayout` (or an int D for flat vectors).
        a, b: groups of entries: a name, ``(name, index)``, a list of those, or flat positions.
    """
    op = "rescaling_mirror"
    layout = _layout_arg(params, op)
    pa, pb = _positions(layout, a, op, "a"), _positions(layout, b, op, "b")
    _disjoint(op, ("a", pa), ("b", pb))
    if pa.numel() == 0 or pb.numel() == 0:
        raise ValueError(f"{op}: a and b must select at least one entry each, got {pa.numel()} and {pb.numel()}")
    if kind == "sign":
        idx = torch.cat([pa, pb])[:, None]
        return Mirror._sparse(layout, idx, torch.ones(idx.shape, dtype=torch.float64), kind="rescaling-sign",
                              description=f"sign flip of a={_desc(a)} and b={_desc(b)}", op=op)
    if kind not in ("swap", "antiswap"):
        raise ValueError(f"{op}: kind must be 'sign', 'swap' or 'antiswap', got {kind!r}")
    if pa.numel() != pb.numel():
        raise ValueError(
            f"{op}: kind={kind!r} pairs a and b entry by entry, so they must select the same number of entries; "
            f"got {pa.numel()} (a) and {pb.numel()} (b)"
        )
    sign = -1.0 if kind == "swap" else 1.0
    idx = torch.stack([pa, pb], dim=1)
    coef = torch.tensor([1.0, sign], dtype=torch.float64).expand(idx.shape)  # (1, -+1)/sqrt(2), stored unnormalized
    what = "swap a <-> b" if kind == "swap" else "a -> -b, b -> -a"
    return Mirror._sparse(layout, idx, coef, kind=f"rescaling-{kind}", description=f"{what} for a={_desc(a)}, b={_desc(b)}", op=op)


def permutation_mirror(params: Any, a: GroupSpec, b: GroupSpec) -> Mirror:
    r"""The mirror of a permutation symmetry :math:`\ell(\theta_a, \theta_b) = \ell(\theta_b, \theta_a)` (eq. 4).

    Eq. 5: ``P = 1/2 [[I, -I], [-I, I]]``, i.e. ``O = [I; -I]/sqrt(2)`` over the paired entries,
    so ``O^T theta = (theta_a - theta_b)/sqrt(2)``, ``R`` swaps ``theta_a`` and ``theta_b`` and the
    stationary condition is ``theta_a = theta_b`` (Theorem 3). ``a`` and ``b`` select the same
    number of entries, paired in order (e.g. a hidden unit's incoming row, bias and outgoing
    column; see :func:`unit_permutation_mirror`).
    """
    op = "permutation_mirror"
    layout = _layout_arg(params, op)
    pa, pb = _positions(layout, a, op, "a"), _positions(layout, b, op, "b")
    if pa.numel() != pb.numel() or pa.numel() == 0:
        raise ValueError(
            f"{op}: theta_a and theta_b must have the same (nonzero) number of entries; got {pa.numel()} (a) and {pb.numel()} (b)"
        )
    _disjoint(op, ("a", pa), ("b", pb))
    idx = torch.stack([pa, pb], dim=1)
    coef = torch.tensor([1.0, -1.0], dtype=torch.float64).expand(idx.shape)  # (1, -1)/sqrt(2), stored unnormalized
    return Mirror._sparse(layout, idx, coef, kind="permutation", description=f"swap {_desc(a)} <-> {_desc(b)}", op=op)


AxisSpec = Union[Tuple[str, int], Tuple[str, Any, int]]


def _axis_positions(layout: ParamLayout, spec: AxisSpec, op: str) -> Tensor:
    """[m, h] flat positions: the entries of one axis spec, the rotated dim last."""
    if not (isinstance(spec, tuple) and len(spec) in (2, 3) and isinstance(spec[0], str)):
        raise TypeError(f"{op}: each axis must be (name, dim) or (name, index, dim), got {spec!r}")
    name, index, dim = (spec[0], slice(None), spec[1]) if len(spec) == 2 else spec
    if name not in layout.names:
        raise KeyError(f"{op}: axis {spec!r} names parameter {name!r}, which is not in params (have {list(layout.names)[:8]})")
    t = layout.index(name)
    grid = torch.arange(layout.numels[t]).view(layout.shapes[t])
    try:
        view = grid[index]
    except (IndexError, TypeError) as e:
        raise IndexError(f"{op}: axis {spec!r} does not index {name!r} of shape {tuple(layout.shapes[t])}: {e}") from None
    if not isinstance(dim, int) or not -view.dim() <= dim < view.dim():
        raise ValueError(f"{op}: axis {spec!r}: dim must be an int in [-{view.dim()}, {view.dim()}) for the selected view of shape {tuple(view.shape)}")
    view = view.movedim(dim, -1)
    return view.reshape(-1, view.shape[-1]) + layout.offsets[t]


def _rotation(params: Any, axes: Sequence[AxisSpec], directions: Optional[Tensor], op: str, kind: str, desc: str) -> Mirror:
    layout = _layout_arg(params, op)
    if isinstance(axes, tuple) and axes and isinstance(axes[0], str):
        axes = [axes]
    blocks = [_axis_positions(layout, a, op) for a in axes]
    hs = {b.shape[1] for b in blocks}
    if len(hs) != 1:
        raise ValueError(f"{op}: every axis must have the same length h (the rotated dimension); got lengths {[b.shape[1] for b in blocks]}")
    h = hs.pop()
    pos = torch.cat(blocks)  # [m, h]
    if directions is None:
        if isinstance(params, (int, ParamLayout)):
            raise ValueError(f"{op}: directions=None picks the least-used direction from the parameter values; pass a dict or a module, or give directions")
        flat = flatten(params).detach().to(torch.float64)
        vals = flat[pos]  # [m, h]
        evals, evecs = torch.linalg.eigh(vals.T @ vals)
        N = evecs[:, :1]
    else:
        if not isinstance(directions, Tensor):
            raise TypeError(f"{op}: directions must be a tensor of shape (h,) or (h, r), got {type(directions).__name__}")
        N = directions.detach().to(torch.float64)
        N = N[:, None] if N.dim() == 1 else N
        if N.dim() != 2 or N.shape[0] != h or N.shape[1] == 0:
            raise ValueError(f"{op}: directions must have shape ({h},) or ({h}, r) with h = {h} the rotated length, got {tuple(directions.shape)}")
        err = (N.T @ N - torch.eye(N.shape[1], dtype=torch.float64)).abs().max().item()
        tol = _default_atol(directions.dtype)
        if not err <= tol:
            raise ValueError(f"{op}: directions must have orthonormal columns; got max |N^T N - I| = {err:.3g} > atol = {tol:.3g}")
        # the nearest exactly orthonormal basis (same span and orientation), so that float32
        # directions give an O orthonormal to float64 precision
        Q, Rq = torch.linalg.qr(N)
        N = Q * torch.sign(torch.diagonal(Rq))[None, :]
    r = N.shape[1]
    # one column of O per (row of the other dims, direction): the direction laid along the axis
    idx = pos[:, None, :].expand(-1, r, -1).reshape(-1, h)
    coef = N.T[None, :, :].expand(pos.shape[0], -1, -1).reshape(-1, h)
    return Mirror._sparse(layout, idx, coef, kind=kind, description=desc, op=op)


def rotation_mirror(params: Any, axes: Union[AxisSpec, Sequence[AxisSpec]], directions: Optional[Tensor] = None) -> Mirror:
    r"""The mirror of a rotation symmetry :math:`\ell(W) = \ell(\Omega W)` (eq. 3, Theorem 2).

    With the orthogonal :math:`\Omega = I - 2NN^\top` (``N``: ``[h, r]`` orthonormal directions)
    acting along one dimension of ``W``, the mirror is the block repetition of ``I - 2NN^T`` over
    the other dims (one block per column of W): ``O^T theta = vec(N^T W)`` and the stationary
    condition ``N^T W = 0`` says W is low-rank with ``N`` in its left null space.

    Args:
        axes: ``(name, dim)`` or ``(name, index, dim)``: the tensor (or the view ``p[index]``) and
            the dim along which Omega acts (dim 0 for eq. 3's ``Omega W``). Several axes of the
            same length rotate together by the same Omega (see :func:`double_rotation_mirror`).
        directions: ``[h]`` or ``[h, r]`` orthonormal; None takes the direction along which the
            current values are smallest (the left singular vector with the smallest singular
            value, so the symmetric solution is Theorem 2's ``W`` with that singular value zeroed).
    """
    return _rotation(params, axes, directions, "rotation_mirror", "rotation", f"rotation along {axes!r}")


def double_rotation_mirror(
    params: Any,
    u: Union[str, AxisSpec, Sequence[Any]],
    w: Union[str, AxisSpec, Sequence[Any]],
    directions: Optional[Tensor] = None,
) -> Mirror:
    r"""The mirror of a double rotation :math:`\ell(U, W) = \ell(UR, R^\top W)` (§2.2).

    With ``R = I - 2NN^T`` (symmetric), ``U -> U R`` and ``W -> R W``: ``O^T theta`` stacks
    ``U N`` and ``N^T W``, and the stationary condition is ``U N = 0`` and ``N^T W = 0``.
    For two consecutive linear maps ``y = W2 (W1 x + b1)`` take ``u = "W2"`` (rotated along its
    columns, dim 1) and ``w = ["W1", ("b1", 0)]`` (rows, dim 0).

    ``u`` and ``w``: a name (U along its last dim, W along dim 0) or axis specs / lists of them as
    in :func:`rotation_mirror`.
    """
    def axes_of(spec, default_dim):
        if isinstance(spec, str):
            return [(spec, default_dim)]
        if isinstance(spec, tuple):
            return [spec]
        out = []
        for s in spec:
            out += axes_of(s, default_dim)
        return out

    axes = axes_of(u, -1) + axes_of(w, 0)
    return _rotation(params, axes, directions, "double_rotation_mirror", "double-rotation", f"U R, R^T W over {axes!r}")


def _unit_axes(layout: ParamLayout, incoming: Sequence[Any], outgoing: Sequence[Any]) -> Tuple[list, list]:
    """(name, dim) of each parameter: names in ``incoming`` default to dim 0, in ``outgoing`` to dim
    1 (dim 0 for 1-D tensors); ``(name, dim)`` pairs are taken as given."""
    def axis(spec, default):
        if isinstance(spec, tuple):
            return spec
        shape = layout.shape_of(spec) if spec in layout.names else None
        return (spec, default if shape is None or len(shape) > default else 0)
    return [axis(x, 0) for x in incoming], [axis(x, 1) for x in outgoing]


def _unit_groups(layout: ParamLayout, incoming: Sequence[Any], outgoing: Sequence[Any], j: int) -> Tuple[list, list]:
    inc, out = _unit_axes(layout, incoming, outgoing)

    def at(name, dim):
        return (name, (slice(None),) * dim + (j,))
    return [at(*x) for x in inc], [at(*x) for x in out]


def _names(specs: Sequence[Any]) -> str:
    return ", ".join(x if isinstance(x, str) else x[0] for x in specs)


def unit_permutation_mirror(params: Any, incoming: Sequence[Any], outgoing: Sequence[Any], i: int, j: int) -> Mirror:
    """The permutation mirror of hidden units ``i`` and ``j`` between two layers.

    ``incoming``: parameters indexed by the unit along dim 0 (the first layer's weight rows and
    bias, per-unit norm/activation parameters); ``outgoing``: parameters indexed along dim 1 (the
    next layer's weight columns). Either list may hold ``(name, dim)`` to give the unit's dim
    explicitly (e.g. ``(b, 0)`` for the factor ``b`` of a low-rank ``W = a b^T``). Holds for any
    elementwise activation between the layers.
    """
    layout = _layout_arg(params, "unit_permutation_mirror")
    ai, ao = _unit_groups(layout, incoming, outgoing, i)
    bi, bo = _unit_groups(layout, incoming, outgoing, j)
    m = permutation_mirror(layout, ai + ao, bi + bo)
    m.description = f"swap hidden units {i} <-> {j} ({_names(incoming)} -> {_names(outgoing)})"
    return m


def unit_sign_mirror(params: Any, incoming: Sequence[Any], outgoing: Sequence[Any], j: int) -> Mirror:
    """The sign-flip mirror of hidden unit ``j`` (rescaling with rho = -1): a mirror when the two
    layers meet with no nonlinearity between them, or through an odd activation (tanh)."""
    layout = _layout_arg(params, "unit_sign_mirror")
    inc, out = _unit_groups(layout, incoming, outgoing, j)
    m = rescaling_mirror(layout, inc, out, kind="sign")
    m.description = f"sign flip of hidden unit {j} ({_names(incoming)} -> {_names(outgoing)})"
    return m


def _desc(spec: Any) -> str:
    s = repr(spec)
    return s if len(s) < 60 else s[:57] + "..."


# =============================================================================== DCS modules
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


def _computed_weight(module: nn.Module) -> bool:
    w = getattr(module, "weight", None) if not isinstance(module, nn.MultiheadAttention) else None
    own = dict(module.named_parameters(recurse=False))
    return isinstance(w, Tensor) and "weight" not in own and not isinstance(w, nn.Parameter)


def _dcs_candidates(module: nn.Module, prefix: str, seed: int = 0):
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
    if not _computed_weight(module):
        return []
    found = [m for m, ok, _ in _dcs_candidates(module, prefix) if ok]
    if params is not None:
        for m in found:
            m.mirror = m.mirror.with_layout(params)
    return found


# =============================================================================== per-sample helpers
def _batch_leaves(batch: Any):
    leaves, spec = tree_flatten(batch)
    return leaves, spec


def _expected_batch_size(leaves: Sequence[Any]) -> Optional[int]:
    for leaf in leaves:
        if isinstance(leaf, Tensor) and leaf.dim() >= 1:
            return leaf.shape[0]
    return None


def _check_per_sample(op: str, loss_fn: Callable, params: Params, batch: Any) -> Tuple[Tensor, List[Optional[int]]]:
    """Calls loss_fn once, checks it returns [B], and returns (losses, in_dims of the batch leaves)."""
    if not callable(loss_fn):
        raise TypeError(f"{op}: loss_fn must be callable as loss_fn(params, batch), got {type(loss_fn).__name__}")
    leaves, _ = _batch_leaves(batch)
    B_exp = _expected_batch_size(leaves)
    out = loss_fn(params, batch)
    exp = f"[B] = [{B_exp}]" if B_exp is not None else "[B]"
    if not isinstance(out, Tensor):
        raise TypeError(f"{op}: loss_fn(params, batch) must return a tensor of per-sample losses of shape {exp}, got {type(out).__name__}")
    if out.dim() != 1:
        hint = " (a scalar: compute the per-sample losses, e.g. reduction='none', instead of their mean)" if out.dim() == 0 else ""
        raise ValueError(f"{op}: loss_fn(params, batch) must return per-sample losses of shape {exp}, got shape {tuple(out.shape)}{hint}")
    if not out.is_floating_point():
        raise TypeError(f"{op}: loss_fn(params, batch) must return floating losses, got {out.dtype}")
    B = out.shape[0]
    dims = [0 if isinstance(l, Tensor) and l.dim() >= 1 and l.shape[0] == B else None for l in leaves]
    if B_exp is not None and B != B_exp:
        raise ValueError(
            f"{op}: loss_fn(params, batch) must return one loss per sample, shape [B] = [{B_exp}] (the batch's leading "
            f"dim), got shape {tuple(out.shape)}"
        )
    if not any(d == 0 for d in dims):
        raise ValueError(f"{op}: loss_fn returned {B} losses but no tensor in batch has leading dimension {B}")
    return out, dims


def _single_sample_fn(loss_fn: Callable, spec, dims: Sequence[Optional[int]]) -> Callable:
    def one(p, *leaves):
        leaves = [l.unsqueeze(0) if d == 0 else l for l, d in zip(leaves, dims)]
        out = loss_fn(p, tree_unflatten(list(leaves), spec))
        return out.reshape(-1)[0]

    return one


def _per_sample(fn: Callable, params: Params, batch: Any, dims: Sequence[Optional[int]], B: int,
                chunk_size: Optional[int]) -> Tuple[Any, str]:
    """vmap of fn(params, *sample_leaves) over the samples, with an exact per-sample loop as fallback
    for ops that have no batching rule. Returns (result with leading B, method used)."""
    leaves, _ = _batch_leaves(batch)
    try:
        return tf.vmap(fn, in_dims=(None, *dims), chunk_size=chunk_size)(params, *leaves), "vmap"
    except (RuntimeError, NotImplementedError) as e:
        reason = str(e).splitlines()[0][:160]
    outs = [fn(params, *[l[i] if d == 0 else l for l, d in zip(leaves, dims)]) for i in range(B)]
    flat, spec = tree_flatten(outs[0])
    stacked = [torch.stack([tree_flatten(o)[0][j] for o in outs]) for j in range(len(flat))]
    return tree_unflatten(stacked, spec), f"loop (vmap failed: {reason})"


def _hvp(f: Callable, params: Params, v: Params) -> Tuple[Params, str]:
    """Exact Hessian-vector product: forward-over-reverse (jvp of grad), or reverse-over-reverse
    (vjp of grad; H is symmetric) for ops without a forward-mode rule."""
    try:
        return tf.jvp(tf.grad(f), (params,), (v,))[1], "jvp(grad)"
    except (RuntimeError, NotImplementedError):
        _, vjp_fn = tf.vjp(tf.grad(f), params)
        return vjp_fn(v)[0], "vjp(grad)"


def _dot(a: Params, b: Params) -> Tensor:
    if isinstance(a, Tensor):
        return (a * b).sum()
    return sum((a[k] * b[k]).sum() for k in a)


def _norm(a: Params) -> Tensor:
    return _dot(a, a).sqrt()


def _scale(a: Params, s) -> Params:
    if isinstance(a, Tensor):
        return a * s
    return {k: v * s for k, v in a.items()}


def _randn_like(params: Params, g: torch.Generator) -> Params:
    if isinstance(params, Tensor):
        return torch.randn(params.shape, generator=g, dtype=torch.float64).to(params)
    return {k: torch.randn(v.shape, generator=g, dtype=torch.float64).to(v) for k, v in params.items()}


def _flat(params: Params) -> Tensor:
    return params.reshape(-1) if isinstance(params, Tensor) else torch.cat([v.reshape(-1) for v in params.values()])


def _check_mirror_fits(op: str, mirror: Mirror, params: Params) -> None:
    if not isinstance(mirror, Mirror):
        raise TypeError(f"{op}: mirror must be a symfast.symmetry.Mirror, got {type(mirror).__name__}")
    mirror.condition(params)  # raises a named error on a layout mismatch


# =============================================================================== verify
@dataclass
class Verification:
    """Result of :func:`verify`: is ``l(theta, x) = l(R theta, x)`` for every sample checked?

    ``passed`` when ``max_abs_deviation <= atol + rtol * scale`` with ``scale = max_i |l(theta, x_i)|``.
    ``vacuous`` when ``R theta = theta`` (theta already satisfies ``O^T theta = 0``: ``|O^T theta| <=
    1e-12 |theta|`` for float64 losses, ``1e-6 |theta|`` otherwise, as in :func:`stationary_report`),
    in which case the check says nothing about the symmetry; ``bool(result)`` is ``passed and not
    vacuous``.
    """

    passed: bool
    vacuous: bool
    max_abs_deviation: float
    relative_deviation: float
    scale: float
    rtol: float
    atol: float
    n_samples: int
    n_batches: int
    condition_norm: float
    description: str = ""

    def __bool__(self) -> bool:
        return self.passed and not self.vacuous

    def __str__(self) -> str:
        status = "PASS" if self.passed else "FAIL"
        if self.vacuous:
            status += " (vacuous: R theta = theta)"
        return (f"{status}: max |l(R theta) - l(theta)| = {self.max_abs_deviation:.3g} (relative {self.relative_deviation:.3g}, "
                f"rtol {self.rtol:g}) over {self.n_samples} samples in {self.n_batches} batches; |O^T theta| = {self.condition_norm:.3g}")


def _default_rtol(dtype: torch.dtype) -> float:
    return {torch.float64: 1e-9, torch.float32: 1e-4}.get(dtype, 2e-2)


def _condition_rtol(dtype: Optional[torch.dtype]) -> float:
    """|O^T theta| <= this * |theta| counts as on the condition (R theta = theta up to rounding):
    a symmetric solution computed in float32 keeps |O^T theta| ~ 1e-8 |theta|, not 0."""
    return 1e-12 if dtype == torch.float64 else 1e-6


def verify(
    loss_fn: Callable[[Params, Any], Tensor],
    params: Params,
    mirror: Mirror,
    batches: Iterable[Any],
    *,
    rtol: Optional[float] = None,
    atol: float = 0.0,
) -> Verification:
    r"""Checks numerically that :math:`\ell(\theta, x) = \ell(R\theta, x)` for every sample.

    Args:
        loss_fn: ``loss_fn(params, batch) -> [B]`` per-sample losses.
        params: dict of tensors (or a flat tensor) in the mirror's layout.
        batches: an iterable of batches (a single tensor counts as one batch).
        rtol: relative tolerance against ``scale = max_i |l(theta, x_i)|``; default 1e-4 for
            float32 losses, 1e-9 for float64 and 2e-2 for half types: well above the rounding of
            reordered sums, far below what breaking a real symmetry does.
        atol: absolute tolerance added to it.
    """
    _check_mirror_fits("verify", mirror, params)
    if isinstance(batches, Tensor):
        batches = [batches]
    reflected = mirror.reflect(params)
    max_dev, scale, n, nb, dtype = 0.0, 0.0, 0, 0, None
    with torch.no_grad():
        for batch in batches:
            a, _ = _check_per_sample("verify", loss_fn, params, batch)
            b = loss_fn(reflected, batch)
            max_dev = max(max_dev, (b.double() - a.double()).abs().max().item() if a.numel() else 0.0)
            scale = max(scale, a.double().abs().max().item() if a.numel() else 0.0)
            n += a.shape[0]
            nb += 1
            dtype = a.dtype
        cond = mirror.condition(params).double().norm().item()
        tnorm = _flat(params).double().norm().item()
    if nb == 0:
        raise ValueError("verify: batches is empty; give at least one batch")
    rtol = _default_rtol(dtype) if rtol is None else float(rtol)
    passed = max_dev <= atol + rtol * scale
    # dtype-dependent, as in stationary_report: in float32 the rounding of a symmetric solution
    # would otherwise make a mirror that is no symmetry look verified
    vacuous = cond <= _condition_rtol(dtype) * max(tnorm, 1e-30) or cond == 0.0
    return Verification(passed, vacuous, max_dev, max_dev / scale if scale > 0 else (0.0 if max_dev == 0 else math.inf),
                        scale, rtol, atol, n, nb, cond, mirror.description)


# =============================================================================== find_symmetries
@dataclass
class SymmetryCheck:
    """One numerical check made by :func:`find_symmetries`: the model output at a parameter point
    against the output at its reflection."""

    mirror: str
    point: str
    max_abs_deviation: float
    relative_deviation: float
    rtol: float
    passed: bool
    vacuous: bool


@dataclass
class SymmetryFinding:
    """A family of mirrors (e.g. all swaps of hidden units of one layer) and its checks.

    ``mirror`` is the first checked member, built on the whole model's parameter layout;
    ``build(*args)`` makes any other member (its arguments depend on ``kind``: ``(i, j)`` for
    permutations, ``(j,)`` for a unit's sign flip, ``(direction,)`` for rotations, ``(head,
    direction)`` for attention heads, ``(a, b)`` for head permutations).
    """

    kind: str
    modules: Tuple[str, ...]
    description: str
    family_size: Union[int, str]
    verified: bool
    checks: List[SymmetryCheck]
    mirror: Optional[Mirror]
    build: Optional[Callable[..., Mirror]] = field(default=None, repr=False)
    note: str = ""


@dataclass
class SymmetryReport:
    """What :func:`find_symmetries` found (``found``), what it rejected (``rejected``) and how."""

    found: List[SymmetryFinding]
    rejected: List[SymmetryFinding]
    mode: str
    rtol: float
    perturbation: str

    @property
    def checked(self) -> List[SymmetryFinding]:
        return self.found + self.rejected

    def __iter__(self):
        return iter(self.found)

    def __len__(self) -> int:
        return len(self.found)

    def kinds(self) -> List[str]:
        return [f.kind for f in self.found]

    def __str__(self) -> str:
        lines = [f"find_symmetries: {len(self.found)} symmetries found, {len(self.rejected)} candidates rejected "
                 f"(model in {self.mode} mode; outputs compared at rtol {self.rtol:g}; {self.perturbation})"]
        for title, group in (("found", self.found), ("rejected", self.rejected)):
            for f in group:
                worst = max((c.relative_deviation for c in f.checks), default=float("nan"))
                # a family is verified on a sample of its members, not on every member
                members = sum(c.point == f.checks[0].point for c in f.checks)  # each member: one check a point
                sample = (f"verified on a sample of {members} members" if title == "found"
                          else f"{members} members checked")
                lines.append(f"  [{title}] {f.kind:<20} {f.description}  (family of {f.family_size}, {sample}; "
                             f"{len(f.checks)} checks, worst relative deviation {worst:.2g}){' - ' + f.note if f.note else ''}")
        return "\n".join(lines)


def _is_linear_like(m: nn.Module) -> bool:
    if isinstance(m, nn.Linear):
        return True
    w = getattr(m, "weight", None)
    return (isinstance(getattr(m, "in_features", None), int) and isinstance(getattr(m, "out_features", None), int)
            and isinstance(w, Tensor) and w.dim() == 2 and tuple(w.shape) == (m.out_features, m.in_features))


def _call_order(model: nn.Module, args: Tuple[Any, ...]) -> List[str]:
    names = {m: n for n, m in model.named_modules()}
    order: List[str] = []
    handles = [m.register_forward_pre_hook(lambda mod, inp: order.append(names[mod])) for m in names if m is not model]
    try:
        with torch.enable_grad():  # keeps torch's inference fast paths (which skip submodules) off
            model(*args)
    finally:
        for h in handles:
            h.remove()
    return order


def _output_leaves(out: Any) -> List[Tensor]:
    return [l for l in tree_flatten(out)[0] if isinstance(l, Tensor)]


def find_symmetries(
    model: nn.Module,
    example_input: Any,
    *,
    checks: int = 3,
    rtol: Optional[float] = None,
    seed: int = 0,
    mode: str = "eval",
) -> SymmetryReport:
    r"""Discovers the mirror symmetries of ``model`` and verifies each numerically.

    Candidates, proposed from the model's structure (the order in which its modules run on
    ``example_input``):

    * for consecutive linear layers A -> B (``nn.Linear`` or any module with ``in_features``,
      ``out_features`` and a matching 2-D ``weight``, e.g. DCS layers) with ``A.out == B.in = h``:
      the permutation of hidden units ``i <-> j`` (A's per-unit parameters along dim 0, per-unit
      parameters of modules run between them such as a LayerNorm's, B's columns); the sign flip
      of one unit (a mirror when no nonlinearity, or an odd one such as tanh, separates A and B);
      the double rotation ``W_B R, R W_A`` of the hidden space (linear factorizations);
    * ``nn.MultiheadAttention``: the rotation of each head's query/key space (``q R, k R`` leaves
      ``q k^T`` unchanged), the rotation of each head's value/output space, and the permutation of
      two heads;
    * DCS-style modules (a ``weight`` computed from the module's parameters): the factor mirrors
      of :func:`dcs_mirrors`.

    Every candidate family is checked on ``checks`` members (e.g. the pairs (0, 1) and random
    pairs, with a seeded generator) by comparing all model outputs at a parameter point with those
    at its reflection, at the model's current parameters and at a random perturbation of them
    (each parameter plus Gaussian noise of its own RMS), so the check is not vacuous when the
    model already sits on the stationary condition. A family is reported in ``found`` when every
    check passes (``max |f(R theta) - f(theta)| <= rtol * max |f(theta)|``), else in ``rejected``
    with its checks. A found family is verified on that sample of its members only, not on all
    of them; the report says so, and :func:`verify` checks any other member.

    Args:
        example_input: one input (or a tuple of positional inputs) for ``model``.
        checks: members of each family checked (a positive int).
        rtol: default 1e-4 for float32 outputs, 1e-9 for float64.
        mode: ``"eval"`` (default) runs the model in eval mode, so dropout is off; batch norm then
            uses running statistics, which are buffers and do not move with the mirrors.
            ``"train"`` keeps training mode (with identical random streams for both runs).
            The model's mode and every buffer (batch-norm running statistics, which training-mode
            forwards update) are restored afterwards: the model is left unchanged.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"find_symmetries: model must be an nn.Module, got {type(model).__name__}")
    if mode not in ("eval", "train"):
        raise ValueError(f"find_symmetries: mode must be 'eval' or 'train', got {mode!r}")
    if not isinstance(checks, int) or isinstance(checks, bool) or checks < 1:
        raise ValueError(f"find_symmetries: checks must be a positive int (members of each family checked), "
                         f"got {checks!r}")
    args = example_input if isinstance(example_input, tuple) else (example_input,)
    was_training = model.training
    # training-mode forwards update batch-norm running statistics in place: a diagnostic must
    # leave the model as it found it, so every buffer is copied and restored
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    model.train(mode == "train")
    try:
        return _find(model, args, checks, rtol, seed, mode)
    finally:
        model.train(was_training)
        with torch.no_grad():
            for n, b in model.named_buffers():
                if n in buffers:
                    b.copy_(buffers[n])


def _find(model: nn.Module, args: Tuple[Any, ...], n_checks: int, rtol: Optional[float], seed: int, mode: str) -> SymmetryReport:
    params = {n: p.detach() for n, p in model.named_parameters()}
    layout = ParamLayout.of(params)
    modules = dict(model.named_modules())
    order = _call_order(model, args)
    g = torch.Generator().manual_seed(seed)

    cuda = sorted({p.device.index or 0 for p in params.values() if p.device.type == "cuda"})

    def run(p: Dict[str, Tensor]) -> List[Tensor]:
        # identical random streams for both runs (dropout and the like in mode="train")
        with torch.no_grad(), torch.random.fork_rng(devices=cuda):
            torch.manual_seed(seed)
            return _output_leaves(tf.functional_call(model, p, args))

    base = run(params)
    out_dtype = base[0].dtype if base else torch.float32
    rtol = _default_rtol(out_dtype) if rtol is None else float(rtol)
    noise = {}
    for n, p in params.items():
        s = p.double().pow(2).mean().sqrt().item() if p.numel() else 0.0
        noise[n] = p + (s if s > 0 else 0.1) * torch.randn(p.shape, generator=g, dtype=torch.float64).to(p)
    points = [(label, p, out, _flat(p).double().norm().item())
              for label, p, out in (("current parameters", params, base), ("perturbed parameters", noise, run(noise)))]

    def check(m: Mirror) -> List[SymmetryCheck]:
        res = []
        for label, p, out, pnorm in points:
            q = m.reflect(p)
            out2 = run(q)
            dev = max(((a.double() - b.double()).abs().max().item() for a, b in zip(out, out2) if a.numel()), default=0.0)
            scale = max((a.double().abs().max().item() for a in out if a.numel()), default=0.0)
            cond = m.condition(p).double().norm().item()
            res.append(SymmetryCheck(m.description, label, dev, dev / scale if scale > 0 else (0.0 if dev == 0 else math.inf),
                                     rtol, dev <= rtol * scale,
                                     cond <= _condition_rtol(out_dtype) * max(pnorm, 1e-30)))
        return res

    found: List[SymmetryFinding] = []
    rejected: List[SymmetryFinding] = []

    def family(kind, mods, desc, size, build, members, note=""):
        cks: List[SymmetryCheck] = []
        first = None
        try:
            for args_ in members:
                m = build(*args_)
                first = first or m
                cks += check(m)
        except Exception as e:  # a candidate that cannot even be applied is rejected, with the reason
            rejected.append(SymmetryFinding(kind, mods, desc, size, False, cks, first, build, f"error: {e}"))
            return
        ok = bool(cks) and all(c.passed for c in cks) and not all(c.vacuous for c in cks)
        if not ok:
            bad = [c for c in cks if not c.passed]
            note = (f"{len(bad)} of {len(cks)} checks failed" if bad else "every check was vacuous (R theta = theta)")
        (found if ok else rejected).append(SymmetryFinding(kind, mods, desc, size, ok, cks, first, build, note))

    def pairs(h: int) -> List[Tuple[int, int]]:
        out = [(0, 1)]
        while len(out) < min(n_checks, h * (h - 1) // 2):
            i, j = torch.randperm(h, generator=g)[:2].tolist()
            if (min(i, j), max(i, j)) not in out:
                out.append((min(i, j), max(i, j)))
        return out

    def units(h: int) -> List[Tuple[int]]:
        return [(j,) for j in list(dict.fromkeys([0] + torch.randperm(h, generator=g).tolist()))[:n_checks]] if h else []

    def directions(h: int, k: int) -> List[Tuple[Tensor]]:
        out = []
        for _ in range(k):
            n = torch.randn(h, generator=g, dtype=torch.float64)
            out.append((n / n.norm(),))
        return out

    # ---- consecutive linear layers
    linear_calls = [i for i, n in enumerate(order) if _is_linear_like(modules[n])]
    seen = set()
    for ia, ib in zip(linear_calls, linear_calls[1:]):
        na, nb = order[ia], order[ib]
        A, B = modules[na], modules[nb]
        h = A.out_features
        if (na, nb) in seen or B.in_features != h or na == nb:
            continue
        seen.add((na, nb))
        def full(prefix, n):
            return f"{prefix}.{n}" if prefix else n

        # A's per-unit parameters run along dim 0 (weight rows, bias, DCS factors, gates); B's along
        # dim 1 for weight-shaped tensors and dim 0 for the input-side factor of a low-rank W = a b^T
        wb = tuple(B.weight.shape)
        pa = [(full(na, n), 0) for n, p in A.named_parameters() if p.dim() >= 1 and p.shape[0] == h]
        pb = [(full(nb, n), 1) for n, p in B.named_parameters() if p.dim() == 2 and p.shape[1] == h and tuple(p.shape) == wb]
        pb += [(full(nb, n), 0) for n, p in B.named_parameters() if p.dim() == 2 and p.shape[0] == h and tuple(p.shape) != wb]
        between = []
        for name in order[ia + 1: ib]:
            if name.startswith(na + ".") or (nb and name.startswith(nb + ".")):
                continue
            for n, p in modules[name].named_parameters(recurse=False):
                if p.dim() == 1 and p.shape[0] == h:
                    between.append((full(name, n), 0))
        between = list(dict.fromkeys(between))
        mods = (na, nb)
        if not pa or not pb:
            rejected.append(SymmetryFinding("permutation", mods, f"hidden units between {na} and {nb}", h, False, [], None,
                                            note=f"no per-unit parameters found in {na if not pa else nb}; not checked"))
            continue
        inc = pa + between
        if h >= 2:
            family("permutation", mods, f"swap hidden units i <-> j between {na} and {nb} (h = {h})", h * (h - 1) // 2,
                   lambda i, j, inc=inc, pb=pb: unit_permutation_mirror(layout, inc, pb, i, j), pairs(h))
        family("sign", mods, f"sign flip of one hidden unit between {na} and {nb}", h,
               lambda j, pa=pa, pb=pb: unit_sign_mirror(layout, pa, pb, j), units(h),
               note="no nonlinearity (or an odd one) between the layers")
        family("rotation", mods, f"double rotation W_{nb} R, R W_{na} of the {h}-dim hidden space", "continuous (O(h))",
               lambda n, pa=pa, pb=pb: rotation_mirror(layout, pa + pb, n),
               directions(h, min(n_checks, 2)), note="linear factorization")

    # ---- attention
    for name in dict.fromkeys(order):
        m = modules[name]
        if not isinstance(m, nn.MultiheadAttention):
            continue
        pre = f"{name}." if name else ""
        E, H = m.embed_dim, m.num_heads
        hd = E // H
        has_bias = (pre + "in_proj_bias") in layout.names
        same = m._qkv_same_embed_dim

        def axes(which, head, pre=pre, E=E, hd=hd, same=same, has_bias=has_bias):
            """Axis specs (rotated dim = the head dim) of q (0), k (1) or v (2) for one head."""
            s = slice(which * E + head * hd, which * E + (head + 1) * hd)
            local = slice(head * hd, (head + 1) * hd)
            if same:
                out = [(pre + "in_proj_weight", s, 0)]
            else:
                out = [(pre + ("q_proj_weight", "k_proj_weight", "v_proj_weight")[which], local, 0)]
            if has_bias:
                out.append((pre + "in_proj_bias", s, 0))
            extra = pre + ("", "bias_k", "bias_v")[which]
            if which > 0 and extra in layout.names:
                out.append((extra, (0, 0, local), 0))
            return out

        def qk(head, n, axes=axes):
            m_ = rotation_mirror(layout, axes(0, head) + axes(1, head), n)
            m_.description = f"query/key rotation of head {head}"
            return m_

        def vo(head, n, axes=axes, pre=pre, hd=hd):
            m_ = rotation_mirror(layout, axes(2, head) + [(pre + "out_proj.weight", (slice(None), slice(head * hd, (head + 1) * hd)), 1)], n)
            m_.description = f"value/output rotation of head {head}"
            return m_

        heads = [0] + torch.randperm(H, generator=g).tolist()
        hs = list(dict.fromkeys(heads))[:max(1, min(n_checks, H))]
        family("attention-qk-rotation", (name,), f"rotation R of one head's query/key space in {name or 'model'} (q R, k R)",
               f"continuous (O({hd}) per head, {H} heads)", qk, [(hh, d) for hh, (d,) in zip(hs, directions(hd, len(hs)))])
        family("attention-vo-rotation", (name,), f"rotation of one head's value/output space in {name or 'model'}",
               f"continuous (O({hd}) per head, {H} heads)", vo, [(hh, d) for hh, (d,) in zip(hs, directions(hd, len(hs)))])
        if H >= 2:
            def heads_perm(a, b, axes=axes, pre=pre, hd=hd):
                def grp(head):
                    out = []
                    for which in range(3):
                        for spec in axes(which, head):
                            out.append((spec[0], spec[1]))
                    out.append((pre + "out_proj.weight", (slice(None), slice(head * hd, (head + 1) * hd))))
                    return out
                m_ = permutation_mirror(layout, grp(a), grp(b))
                m_.description = f"swap attention heads {a} <-> {b}"
                return m_
            family("head-permutation", (name,), f"swap two attention heads in {name or 'model'}", H * (H - 1) // 2,
                   heads_perm, pairs(H))

    # ---- DCS-style factorizations
    for name in dict.fromkeys(order):
        m = modules[name]
        if isinstance(m, nn.MultiheadAttention) or not _computed_weight(m):
            continue
        pre = f"{name}." if name else ""
        for cand, ok_weight, dev in _dcs_candidates(m, pre, seed):
            mir = cand.mirror.with_layout(layout)
            if not ok_weight:
                rejected.append(SymmetryFinding(cand.kind, (name,), cand.description, 1, False, [], mir,
                                                note=f"changes {name}.weight (max deviation {dev:.2g}); not checked further"))
                continue
            family(cand.kind, (name,), cand.description, 1, lambda mir=mir: mir, [()], note="DCS factor mirror")

    return SymmetryReport(found, rejected, mode, rtol,
                          f"perturbation: each parameter + N(0, rms^2), seed {seed}")


# =============================================================================== stationary_report
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
        per_sample_hessian: also check the block per sample (``[B, n_pairs]``; B more HVPs each).
        chunk_size: samples per vmap chunk (bounds the ``[chunk, D]`` per-sample gradients).
    """
    op = "stationary_report"
    _check_mirror_fits(op, mirror, params)
    if n_pairs < 1:
        raise ValueError(f"{op}: n_pairs must be >= 1, got {n_pairs}")
    if eigen not in (True, False, "auto"):
        raise ValueError(f"{op}: eigen must be True, False or 'auto', got {eigen!r}")
    losses, dims = _check_per_sample(op, loss_fn, params, batch)
    B = losses.shape[0]
    params = {k: v.detach() for k, v in params.items()} if isinstance(params, Mapping) else params.detach()
    leaves, spec = _batch_leaves(batch)
    methods: Dict[str, str] = {}
    dtype = losses.dtype

    # ---- part 1
    one = _single_sample_fn(loss_fn, spec, dims)
    grads, methods["per_sample_grad"] = _per_sample(tf.grad(one), params, batch, dims, B, chunk_size)
    gcond = mirror.condition(grads, batch_dims=1) if isinstance(grads, Mapping) else mirror.condition(grads)
    gflat = torch.cat([v.reshape(B, -1) for v in grads.values()], 1) if isinstance(grads, Mapping) else grads.reshape(B, -1)
    cond = mirror.condition(params).double().norm().item()
    tnorm = _flat(params).double().norm().item()

    def mean_loss(p):
        return loss_fn(p, batch).mean()

    mean_grad = tf.grad(mean_loss)(params)
    mgc = mirror.condition(mean_grad).double().norm().item()

    # ---- part 2: block check
    g = torch.Generator().manual_seed(seed)
    blocks, scales, per_blocks = [], [], []
    hvp_method = ""
    for _ in range(n_pairs):
        z = torch.randn(mirror.rank, generator=g, dtype=torch.float64)
        n = mirror.expand(z.to(dtype), like=params)
        n = _scale(n, 1.0 / _norm(n))
        m = mirror.symmetric_solution(_randn_like(params, g))
        mn = _norm(m)
        if mn.item() == 0:  # im O is everything: ker O^T = {0}
            blocks.append(torch.zeros((), dtype=torch.float64))
            scales.append(torch.zeros((), dtype=torch.float64))
            continue
        m = _scale(m, 1.0 / mn)
        Hn, hvp_method = _hvp(mean_loss, params, n)
        blocks.append(_dot(m, Hn).abs().double())
        scales.append(_norm(Hn).double())
        if per_sample_hessian:
            def blk(p, *lv, n=n, m=m):
                return _dot(m, _hvp(lambda q: one(q, *lv), p, n)[0])
            vals, methods["per_sample_hessian"] = _per_sample(blk, params, batch, dims, B, chunk_size)
            per_blocks.append(vals.abs().double())
    methods["hvp"] = hvp_method or "none needed for the block check (ker O^T = {0})"

    # ---- eigen-directions of O^T H O
    k = mirror.rank
    do_eigen = eigen is True or (eigen == "auto" and k <= max_eigen_rank)
    evals = evecs = resid = None
    note = ""
    if do_eigen:
        HO = []
        for j in range(k):
            e = torch.zeros(k, dtype=dtype)
            e[j] = 1
            col, methods["eigen_hvp"] = _hvp(mean_loss, params, mirror.expand(e, like=params))
            HO.append(_flat(col).double())
        HO = torch.stack(HO, 1)  # [D, k]
        Ob = mirror.basis.double() if isinstance(params, Tensor) else _basis_like(mirror, params)
        A = Ob.T @ HO
        evals, V = torch.linalg.eigh((A + A.T) / 2)
        evecs = Ob @ V
        resid = (HO @ V - evecs * evals).norm(dim=0)
        note = f"computed from {k} Hessian-vector products"
    else:
        note = f"skipped: k = {k} > max_eigen_rank = {max_eigen_rank}" if eigen == "auto" else "skipped: eigen=False"

    eps_rel = _condition_rtol(dtype)
    ver = verify(loss_fn, params, mirror, [batch])
    return StationaryReport(
        condition_norm=cond,
        theta_norm=tnorm,
        on_condition=cond <= eps_rel * max(tnorm, 1e-30) or cond == 0.0,
        grad_condition=gcond.double().norm(dim=-1),
        grad_norm=gflat.double().norm(dim=-1),
        mean_grad_condition=mgc,
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


def _basis_like(mirror: Mirror, params: Mapping[str, Tensor]) -> Tensor:
    """O as dense [D, k] in the flattening order of ``params`` (which may differ from the mirror's layout)."""
    k = mirror.rank
    cols = [_flat(mirror.expand(torch.eye(k, dtype=torch.float64)[j], like={n: v.double() for n, v in params.items()}))
            for j in range(k)]
    return torch.stack(cols, 1)
