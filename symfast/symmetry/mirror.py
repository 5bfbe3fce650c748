r"""The mirror ``O`` of Definition 2: orthonormal columns, with ``R = I - 2 O O^T``.

:class:`Mirror` is dense (from orthonormal columns or a projection) or sparse (from the
constructors in :mod:`symfast.symmetry.constructors`), and acts on flat parameter vectors and on
dicts of parameter tensors.
"""

from __future__ import annotations

from typing import Dict, Mapping, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from ..orthonormal import orthonormality_error
from .layout import ParamLayout, Params, default_atol

__all__ = ["Mirror"]


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
        tol = default_atol(O.dtype) if atol is None else float(atol)
        err = orthonormality_error(O)
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
        tol = default_atol(P.dtype) if atol is None else float(atol)
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
        back = self._apply_transpose(self._apply(z))
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
        return self._scatter_full(self._apply(eye)).T.contiguous()

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
    def _apply_transpose(self, x: Tensor) -> Tensor:
        """O^T x for compact x of shape [..., n]."""
        if self._dense is not None:
            return x @ self._dense.to(device=x.device, dtype=x.dtype)
        index, coef, sq = self._operands(x)
        return (x[..., index] * coef).sum(-1) / sq.sqrt()

    def _apply(self, c: Tensor) -> Tensor:
        """O c for c of shape [..., k], in compact coordinates."""
        if self._dense is not None:
            return c @ self._dense.to(device=c.device, dtype=c.dtype).T
        index, coef, sq = self._operands(c)
        return self._scatter_cols(c / sq.sqrt(), index, coef)

    def _apply_projection(self, x: Tensor) -> Tensor:
        """O O^T x for compact x."""
        if self._dense is not None:
            return self._apply(self._apply_transpose(x))
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
    def _in_working_precision(x: Tensor) -> Tensor:
        if x.is_floating_point() and x.dtype != torch.float64 and x.device.type != "mps":
            return x.to(torch.float64)
        return x

    def condition(self, theta: Params, *, batch_dims: int = 0) -> Tensor:
        """O^T theta, shape ``[..., k]``: zero exactly on the stationary condition.

        ``batch_dims`` is the number of leading batch dims of each tensor when theta is a dict
        (for a flat tensor every dim but the last is a batch dim)."""
        compact, _ = self._split_input(theta, "condition", batch_dims)
        narrow = compact.is_floating_point() and compact.dtype != torch.float64 and compact.device.type != "mps"
        if self._dense is None and narrow:
            # gather the k columns' entries first, then widen: the same float64 arithmetic as
            # widening all of compact, without a float64 copy of [..., n] (per-sample gradients)
            index, coef, sq = self._operands(compact.new_empty(0, dtype=torch.float64))
            return ((compact[..., index].to(torch.float64) * coef).sum(-1) / sq.sqrt()).to(compact.dtype)
        return self._apply_transpose(self._in_working_precision(compact)).to(compact.dtype)

    def project(self, theta: Params) -> Params:
        """O O^T theta (the component that the reflection flips; zero on untouched parameters)."""
        compact, _ = self._split_input(theta, "project")
        p = self._apply_projection(self._in_working_precision(compact))
        if isinstance(theta, Mapping):
            _, rebuild = self._split_input({k: torch.zeros_like(v) for k, v in theta.items()}, "project")
            return rebuild(p)
        return self._scatter_full(p).to(compact.dtype)

    def symmetric_solution(self, theta: Params) -> Params:
        """(I - O O^T) theta: the fixed point of the reflection closest to theta."""
        compact, rebuild = self._split_input(theta, "symmetric_solution")
        x = self._in_working_precision(compact)
        return rebuild(x - self._apply_projection(x))

    def reflect(self, theta: Params) -> Params:
        """R theta = (I - 2 O O^T) theta."""
        compact, rebuild = self._split_input(theta, "reflect")
        x = self._in_working_precision(compact)
        return rebuild(x - 2 * self._apply_projection(x))

    def expand(self, c: Tensor, *, like: Optional[Params] = None) -> Params:
        """O c for coefficients ``c`` of shape ``[..., k]``: a flat ``[..., D]`` tensor, or a dict
        shaped like ``like`` (with its dtypes; zeros on parameters the mirror does not touch)."""
        if not isinstance(c, Tensor) or c.shape[-1:] != (self.rank,):
            raise ValueError(f"Mirror.expand: c must be a tensor of shape (..., {self.rank}) (k), got {tuple(getattr(c, 'shape', ()))}")
        if isinstance(like, Tensor):
            c = c.to(like.device)
        elif isinstance(like, Mapping) and like:
            c = c.to(next(iter(like.values())).device)
        full = self._apply(c)
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


def check_mirror_fits(op: str, mirror: Mirror, params: Params) -> None:
    if not isinstance(mirror, Mirror):
        raise TypeError(f"{op}: mirror must be a symfast.symmetry.Mirror, got {type(mirror).__name__}")
    mirror.condition(params)  # raises a named error on a layout mismatch
