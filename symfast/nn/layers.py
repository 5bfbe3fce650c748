r"""Drop-in DCS layers: nn.Linear, nn.Conv1d/2d/3d and nn.Embedding with a structured weight.

Each layer is a subclass of the torch layer it replaces (``isinstance(layer,
nn.Linear)`` holds, and every attribute such as ``in_features`` or ``stride`` is
there), but its weight is not a parameter: it is theta = T(factors) of a
:mod:`~symfast.nn.structures` structure held in ``layer.parametrization``, and
``layer.weight`` computes it (through the fused op), so code that reads
``.weight`` keeps working (writing into it in place, as ``nn.init.*_`` does,
changes a temporary: use :meth:`DCSLayer.set_weight`). The penalty ``layer.penalty()`` is
``alpha * sum |factor|^2``; at its minimum over factorizations it is the convex
penalty of the structure (lasso, group lasso, nuclear norm, |O^T theta|_1).

Structure keywords (keyword-only, after torch's own arguments):

* ``structure``: ``"elementwise"`` (default), ``"group"``, ``"lowrank"`` or ``"mirror"``.
* ``alpha``: the weight decay on the factors (default 0: no penalty).
* ``group_dim``: for ``"group"``, the dimension of theta the groups run along.
  Linear: 0 groups output units (neuron pruning, the default), 1 input
  features (feature selection). Conv: 0 output channels (default), 1 input
  channels. Embedding: 1 embedding features (default), 0 rows (tokens).
* ``rank``: for ``"lowrank"``, the inner dimension of W = A B^T (default full).
* ``mask``: for ``"elementwise"``, the constrained coordinates (bool,
  broadcastable to the weight); the rest is free (``v``).
* ``mirror``, ``mirror_dim``: for ``"mirror"``, the (n, k) matrix O with
  orthonormal columns and the dimension it acts along (None: the flattened
  weight). See :func:`~symfast.nn.permutation_basis`.
* ``constrain_bias``: False (default) leaves the bias an ordinary parameter.
  True puts it under DCS too: with ``structure="group"`` and output groups
  (``group_dim=0``) the bias joins its unit's group (a dead unit is then
  entirely zero), otherwise it gets its own elementwise (L1) DCS with the same
  alpha. Not available for ``"mirror"``.

A fresh layer draws theta (and the bias) exactly as torch would, with the same
random numbers (with a reduced ``rank``: its best rank-``rank`` approximation,
rescaled to the same Frobenius norm), and factors it off every stationary condition
(:meth:`Structure.set_theta`); :meth:`from_dense` converts an existing layer
without drawing any random number, computing the same function.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn import init

from .structures import STRUCTURES, Elementwise, Group, LowRank, MirrorStructure, Structure, check_alpha

__all__ = ["DCSLinear", "DCSConv1d", "DCSConv2d", "DCSConv3d", "DCSEmbedding", "DCSLayer"]


class DCSLayer:
    """Mixin shared by the DCS layers: the structure, ``.weight``, ``.bias``, penalty, export."""

    parametrization: Structure
    bias_parametrization: Optional[Structure]
    _dense_cls: type
    _default_group_dim: int = 0
    # The dimension of theta that indexes output units (and the bias): 0 for torch's
    # layers; transformers' Conv1D stores its weight transposed, (in, out).
    _out_dim: int = 0

    def __prepare_scriptable__(self):
        # torch.jit.script calls this on every submodule before compiling. The
        # DCS layers dispatch on a Python structure object and call custom ops
        # through torch.library, which TorchScript cannot compile; without this
        # hook the user gets "Unknown type annotation: 'Structure'", which names
        # neither the layer nor a way out.
        raise RuntimeError(
            f"torch.jit.script: {type(self).__name__} is not supported (TorchScript is deprecated in PyTorch "
            "and cannot compile symfast's custom ops). Use torch.compile(model) to compile a model with DCS "
            "layers, or symfast.export(model) to get plain torch modules, which TorchScript accepts."
        )

    # ------------------------------------------------------------ set-up
    def _setup_dcs(
        self,
        weight_shape: torch.Size,
        has_bias: bool,
        *,
        structure: str,
        alpha: float,
        group_dim: Optional[int],
        rank: Optional[int],
        mask: Optional[Tensor],
        mirror: Optional[Tensor],
        mirror_dim: Optional[int],
        constrain_bias: bool,
        device,
        dtype,
    ) -> None:
        """Replaces the (meta) weight and bias that the torch constructor made by the DCS factors."""
        name = type(self).__name__
        if structure not in STRUCTURES:
            raise ValueError(f"{name}: structure must be one of {STRUCTURES}, got {structure!r}")
        given = {"group_dim": group_dim, "rank": rank, "mask": mask, "mirror": mirror, "mirror_dim": mirror_dim}
        allowed = {"elementwise": {"mask"}, "group": {"group_dim"}, "lowrank": {"rank"},
                   "mirror": {"mirror", "mirror_dim"}}[structure]
        stray = [k for k, v in given.items() if v is not None and k not in allowed]
        if stray:
            raise ValueError(f"{name}: {', '.join(stray)} has no meaning for structure={structure!r}")
        if structure == "mirror" and mirror is None:
            raise ValueError(f"{name}: structure='mirror' needs mirror=O, an (n, k) tensor with orthonormal columns")
        if constrain_bias and structure == "mirror":
            raise ValueError(f"{name}: constrain_bias=True is not available for structure='mirror'")
        if constrain_bias and not has_bias:
            raise ValueError(f"{name}: constrain_bias=True needs a bias (bias=True)")

        del self._parameters["weight"]  # the constructor's meta placeholder
        factory = {"device": device, "dtype": dtype}
        weight_shape = torch.Size(weight_shape)
        self._weight_shape = weight_shape
        self.structure = structure
        self.constrain_bias = bool(constrain_bias)
        self._bias_mode = "free"
        gdim = None
        if structure == "group":
            gdim = self._default_group_dim if group_dim is None else group_dim
            if not isinstance(gdim, int) or isinstance(gdim, bool) or not -len(weight_shape) <= gdim < len(weight_shape):
                raise ValueError(
                    f"{name}: group_dim must be an int in [{-len(weight_shape)}, {len(weight_shape) - 1}], got {gdim!r}"
                )
            gdim %= len(weight_shape)
            if gdim == 1 and getattr(self, "groups", 1) > 1:
                # Dim 1 of a grouped conv's weight indexes the input channels *within* a
                # group: one gate there would tie channel c of every group together.
                raise ValueError(
                    f"{name}: group_dim=1 (input channels) is not supported for a grouped convolution "
                    f"(groups={self.groups}): weight dim 1 holds in_channels/groups = "
                    f"{weight_shape[1]} channels per group, not the {self.in_channels} input channels; "
                    "use group_dim=0 (output channels)")
        self.group_dim = gdim

        if structure == "elementwise":
            p = Elementwise(weight_shape, alpha=alpha, mask=mask, **factory)
        elif structure == "group":
            if constrain_bias and gdim == self._out_dim:
                # The bias joins its unit's group: theta_aug = [W_g | b_g] per output unit.
                self._bias_mode = "joint"
                p = Group(self._joint_shape(weight_shape), alpha=alpha, dim=self._out_dim, **factory)
            else:
                p = Group(weight_shape, alpha=alpha, dim=gdim, **factory)
        elif structure == "lowrank":
            p = LowRank(weight_shape, alpha=alpha, rank=rank, **factory)
        else:
            p = MirrorStructure(weight_shape, alpha=alpha, O=mirror, dim=mirror_dim, **factory)
        self.parametrization = p

        out = weight_shape[self._out_dim] if not isinstance(self, nn.Embedding) else None
        if has_bias:
            if constrain_bias and self._bias_mode != "joint":
                self._bias_mode = "elementwise"
            if self._bias_mode == "free":
                self._parameters["bias"] = nn.Parameter(torch.empty(out, **factory))
            else:
                self._parameters.pop("bias", None)
        if self._bias_mode == "elementwise":
            self.bias_parametrization = Elementwise((out,), alpha=alpha, **factory)
        else:
            self.bias_parametrization = None

    # ---------------------------------------------------- weight and bias
    def _joint_shape(self, weight_shape: torch.Size) -> Tuple[int, int]:
        """Shape of theta_aug, the weight viewed as (out, fan) with the bias as one more column."""
        return (weight_shape[0], weight_shape.numel() // weight_shape[0] + 1)

    def _join(self, weight: Tensor, bias: Tensor) -> Tensor:
        """theta_aug from the weight and the bias (see :meth:`_joint_shape`)."""
        return torch.cat([weight.reshape(weight.shape[0], -1), bias.reshape(-1, 1).to(weight)], dim=1)

    def _split(self, aug: Tensor) -> Tuple[Tensor, Tensor]:
        """(weight, bias) from theta_aug: the inverse of :meth:`_join`."""
        return aug[:, :-1].reshape(self._weight_shape), aug[:, -1]

    def weight_and_bias(self) -> Tuple[Tensor, Optional[Tensor]]:
        """(theta, bias), each computed once."""
        theta = self.parametrization()
        if self._bias_mode == "joint":
            return self._split(theta)
        if self._bias_mode == "elementwise":
            return theta, self.bias_parametrization()
        return theta, self._parameters.get("bias")

    @property
    def weight(self) -> Tensor:
        """theta = T(factors), computed through the structure's op (differentiable)."""
        return self.weight_and_bias()[0]

    @property
    def bias(self) -> Optional[Tensor]:
        """The bias: a plain parameter, or computed from its factors with ``constrain_bias=True``."""
        mode = self.__dict__.get("_bias_mode", "free")
        if mode == "joint":
            return self._split(self.parametrization())[1]
        if mode == "elementwise":
            return self.bias_parametrization()
        if "bias" in self._parameters:
            return self._parameters["bias"]
        # Not registered (yet): lets torch's constructor register it.
        raise AttributeError(f"'{type(self).__name__}' object has no attribute 'bias'")

    @property
    def alpha(self) -> float:
        """The weight decay on the factors (shared by the weight's and the bias' structures)."""
        return self.parametrization.alpha

    @alpha.setter
    def alpha(self, value: float) -> None:
        for p in self.structures():
            p.alpha = check_alpha(value)

    # ------------------------------------------------------------ penalty
    def structures(self) -> List[Structure]:
        return [p for p in (self.parametrization, self.bias_parametrization) if p is not None]

    def penalty(self) -> Tensor:
        """alpha * sum |factor|^2 over this layer's constrained factors."""
        return sum(p.penalty() for p in self.structures())

    @torch.no_grad()
    def convex_penalty(self) -> Tensor:
        """The equivalent convex penalty of the current theta (and constrained bias)."""
        if self._bias_mode == "joint":
            return self.parametrization.convex_penalty()
        return sum(p.convex_penalty() for p in self.structures())

    # ------------------------------------------------------- init / convert
    def reset_parameters(self) -> None:
        """Draws theta and bias as the torch layer does (same random numbers) and factors them."""
        if "parametrization" not in self._modules:  # called by the torch constructor, on meta
            return
        p = self._ref_param()
        if p.is_meta:  # no values to draw: as torch's own layers on meta (to_empty, then reset_parameters)
            return
        for structure in (self.parametrization, self.bias_parametrization):
            if structure is not None:
                structure.reset_buffers()  # a mask or O that to_empty left uninitialized
        theta, bias = self._draw_initial(p.device, p.dtype)
        if isinstance(self.parametrization, LowRank) and self.parametrization.rank < min(
                self.parametrization.rows, self.parametrization.cols):
            theta = self.parametrization.truncate(theta)  # reduced rank: same variance, rank `rank`
        self.set_weight(theta, bias)

    def _draw_initial(self, device, dtype) -> Tuple[Tensor, Optional[Tensor]]:
        """(theta, bias) drawn as the torch layer's own initialization draws them, same random numbers."""
        theta = torch.empty(self._weight_shape, device=device, dtype=dtype)
        bias = None
        if isinstance(self, nn.Embedding):
            init.normal_(theta)
            if self.padding_idx is not None:
                theta[self.padding_idx].fill_(0)
        else:
            # nn.Linear / nn.Conv*d.reset_parameters, in the same order.
            init.kaiming_uniform_(theta, a=math.sqrt(5))
            if self._has_bias():
                fan_in, _ = init._calculate_fan_in_and_fan_out(theta)
                bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
                bias = torch.empty(self._weight_shape[0], device=device, dtype=dtype)
                init.uniform_(bias, -bound, bound)
        return theta, bias

    def _ref_param(self) -> Tensor:
        return self.parametrization.penalized_parameters()[0]

    def _has_bias(self) -> bool:
        return self._bias_mode != "free" or self._parameters.get("bias") is not None

    @torch.no_grad()
    def set_weight(self, weight: Tensor, bias: Optional[Tensor] = None) -> None:
        """Factors ``weight`` (and ``bias``, if the layer has one) so that the layer computes them."""
        weight = weight.detach()
        if weight.shape != self._weight_shape:
            raise ValueError(
                f"{type(self).__name__}.set_weight: weight must have shape {tuple(self._weight_shape)}, "
                f"got {tuple(weight.shape)}"
            )
        has_bias = self._has_bias()
        if bias is not None and not has_bias:
            raise ValueError(f"{type(self).__name__}.set_weight: this layer has no bias")
        if has_bias and bias is None:
            raise ValueError(f"{type(self).__name__}.set_weight: this layer has a bias; pass bias=...")
        if self._ref_param().is_meta or weight.is_meta:
            # A meta layer holds no values (from_dense of a model built on meta): the
            # factors stay uninitialized until to_empty(...) and reset_parameters().
            return
        if self._bias_mode == "joint":
            self.parametrization.set_theta(self._join(weight, bias.detach()))
            return
        self.parametrization.set_theta(weight)
        if self._bias_mode == "elementwise":
            self.bias_parametrization.set_theta(bias.detach())
        elif has_bias:
            self._parameters["bias"].copy_(bias.detach())

    @classmethod
    def _options_from(cls, module: nn.Module) -> Dict[str, Any]:  # pragma: no cover - per class
        raise NotImplementedError

    @classmethod
    def from_dense(cls, module: nn.Module, **dcs_options: Any) -> "DCSLayer":
        """The DCS layer computing the same function as ``module`` (an instance of the torch layer).

        ``dcs_options`` are the structure keywords (structure, alpha, group_dim, rank,
        mask, mirror, mirror_dim, constrain_bias). No random number is drawn.
        """
        if not isinstance(module, cls._dense_cls):
            raise TypeError(
                f"{cls.__name__}.from_dense: expected a {cls._dense_cls.__name__}, got {type(module).__name__}"
            )
        weight = module.weight
        options = cls._options_from(module)
        obj = cls.__new__(cls)
        object.__setattr__(obj, "_skip_reset", True)
        cls.__init__(obj, **options, device=weight.device, dtype=weight.dtype, **dcs_options)
        object.__setattr__(obj, "_skip_reset", False)
        obj.set_weight(weight, getattr(module, "bias", None) if not isinstance(module, nn.Embedding) else None)
        obj.train(module.training)
        return obj

    @classmethod
    def tied_to(cls, module: nn.Module, parametrization: Structure, **dcs_options: Any) -> "DCSLayer":
        """The DCS layer computing ``module``'s function with its weight taken from ``parametrization``,
        the structure of another DCS layer: a tied weight, one set of factors and one penalty for both.

        Use it for a module whose weight is the same tensor as the one ``parametrization``
        was factored from (``symfast.convert`` does, for tied embeddings): the weight is not
        factored again. ``dcs_options`` are :meth:`from_dense`'s and must describe
        ``parametrization`` (same structure, shape and options). The bias stays this layer's
        own, free or, with ``constrain_bias=True``, under its own elementwise DCS; joining it
        to the weight's groups (output groups with ``constrain_bias=True``) would put it in
        a structure other layers share, and is a ValueError.
        """
        name = f"{cls.__name__}.tied_to"
        if not isinstance(module, cls._dense_cls):
            raise TypeError(f"{name}: expected a {cls._dense_cls.__name__}, got {type(module).__name__}")
        if not isinstance(parametrization, Structure):
            raise TypeError(f"{name}: parametrization must be a symfast.nn Structure, got {type(parametrization).__name__}")
        weight = module.weight
        obj = cls.__new__(cls)
        object.__setattr__(obj, "_skip_reset", True)
        # On meta: nothing is allocated or factored for the weight, which comes from parametrization.
        cls.__init__(obj, **cls._options_from(module), device="meta", dtype=weight.dtype, **dcs_options)
        object.__setattr__(obj, "_skip_reset", False)
        if obj._bias_mode == "joint":
            raise ValueError(
                f"{name}: constrain_bias=True with groups over output units would put this layer's bias into "
                "the groups of a weight other layers share; use constrain_bias=False or another group_dim")
        wanted = obj.parametrization
        if type(wanted) is not type(parametrization) or wanted.extra_repr() != parametrization.extra_repr():
            raise ValueError(f"{name}: parametrization must be the structure dcs_options describe, "
                             f"{type(wanted).__name__}({wanted.extra_repr()}), got "
                             f"{type(parametrization).__name__}({parametrization.extra_repr()})")
        ref = parametrization.penalized_parameters()[0]
        bias = module._parameters.get("bias") if not isinstance(module, nn.Embedding) else None
        with torch.no_grad():
            if obj._bias_mode == "elementwise":
                obj.bias_parametrization.to_empty(device=ref.device)
                obj.bias_parametrization.set_theta(bias.detach().to(ref.dtype))
            elif bias is not None:
                obj._parameters["bias"] = nn.Parameter(bias.detach().to(device=ref.device, dtype=ref.dtype).clone(),
                                                       requires_grad=bias.requires_grad)
        obj.parametrization = parametrization
        return obj.train(module.training)

    def _finish_init(self) -> None:
        if not self.__dict__.get("_skip_reset", False):
            self.reset_parameters()

    # -------------------------------------------------------------- export
    @torch.no_grad()
    def to_dense(self, threshold: float = 0.0, *, thin: bool = True) -> nn.Module:
        """A plain torch module computing this layer's function, with the structure's
        parts of size <= threshold set to exact zeros (see :func:`symfast.export`).

        Low rank becomes two thin layers when that has fewer parameters, unless
        ``thin=False`` (a tied weight: its layers must keep one shared weight).
        """
        theta = self.parametrization.thresholded(threshold)
        bias = None
        if self._bias_mode == "joint":
            theta, bias = self._split(theta)
        elif self._bias_mode == "elementwise":
            bias = self.bias_parametrization.thresholded(threshold)
        elif self._parameters.get("bias") is not None:
            bias = self._parameters["bias"].detach()
        if thin and isinstance(self.parametrization, LowRank):
            with warnings.catch_warnings():
                # A dead layer (rank 0) exports as two thin layers of width 0, whose
                # random init torch warns is a no-op; their weights are copied anyway.
                warnings.filterwarnings("ignore", "Initializing zero-element tensors is a no-op")
                thin = self._thin(threshold, bias)
            if thin is not None:
                return thin.train(self.training)
        dense = self._make_dense(theta.shape, bias is not None, theta.device, theta.dtype)
        dense.weight.copy_(theta)
        if bias is not None:
            dense.bias.copy_(bias)
        return dense.train(self.training)

    def _make_dense(self, shape, has_bias, device, dtype) -> nn.Module:  # pragma: no cover - per class
        raise NotImplementedError

    def _thin(self, threshold: float, bias: Optional[Tensor]) -> Optional[nn.Module]:  # pragma: no cover
        return None

    def _dcs_repr(self) -> str:
        parts = [f"structure={self.structure}", f"alpha={self.alpha:g}"]
        if self.structure == "group":
            parts.append(f"group_dim={self.group_dim}")
        if self.structure == "lowrank":
            parts.append(f"rank={self.parametrization.rank}")
        if self.structure == "mirror":
            parts.append(f"mirror={tuple(self.parametrization.O.shape)}, mirror_dim={self.parametrization.dim}")
        if self.structure == "elementwise" and self.parametrization.mask is not None:
            parts.append("mask=True")
        if self.constrain_bias:
            parts.append("constrain_bias=True")
        return ", ".join(parts)


def layer_options(structure, alpha, group_dim, rank, mask, mirror, mirror_dim, constrain_bias, device, dtype):
    """The keyword options every DCS layer passes to ``DCSLayer._setup_dcs`` (shared by the layers here and
    the transformers ``Conv1D`` twin)."""
    return dict(structure=structure, alpha=alpha, group_dim=group_dim, rank=rank, mask=mask, mirror=mirror,
                mirror_dim=mirror_dim, constrain_bias=constrain_bias, device=device, dtype=dtype)


# ---------------------------------------------------------------- Linear
class DCSLinear(DCSLayer, nn.Linear):
    r"""nn.Linear with a structured weight: y = x theta^T + b, theta = T(factors).

    Same arguments as :class:`torch.nn.Linear`, plus the keyword-only structure
    options of :mod:`symfast.nn.layers` (structure, alpha, group_dim, rank, mask,
    mirror, mirror_dim, constrain_bias).
    """

    _dense_cls = nn.Linear
    _default_group_dim = 0

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        structure: str = "elementwise",
        alpha: float = 0.0,
        group_dim: Optional[int] = None,
        rank: Optional[int] = None,
        mask: Optional[Tensor] = None,
        mirror: Optional[Tensor] = None,
        mirror_dim: Optional[int] = None,
        constrain_bias: bool = False,
    ) -> None:
        nn.Linear.__init__(self, in_features, out_features, bias, device="meta", dtype=dtype)
        self._setup_dcs(
            torch.Size((out_features, in_features)), bias,
            **layer_options(structure, alpha, group_dim, rank, mask, mirror, mirror_dim, constrain_bias, device, dtype),
        )
        self._finish_init()

    @classmethod
    def _options_from(cls, module: nn.Linear) -> Dict[str, Any]:
        return dict(in_features=module.in_features, out_features=module.out_features, bias=module.bias is not None)

    def forward(self, input: Tensor) -> Tensor:
        weight, bias = self.weight_and_bias()
        return F.linear(input, weight, bias)

    def _make_dense(self, shape, has_bias, device, dtype) -> nn.Module:
        return nn.Linear(shape[1], shape[0], bias=has_bias, device=device, dtype=dtype)

    def _thin(self, threshold, bias):
        left, right = self.parametrization.thin_factors(threshold)  # theta ~ left @ right^T
        r = left.shape[1]
        if r * (self.in_features + self.out_features) >= self.in_features * self.out_features:
            return None
        dev, dt = left.device, left.dtype
        first = nn.Linear(self.in_features, r, bias=False, device=dev, dtype=dt)
        second = nn.Linear(r, self.out_features, bias=bias is not None, device=dev, dtype=dt)
        first.weight.copy_(right.t())
        second.weight.copy_(left)
        if bias is not None:
            second.bias.copy_(bias)
        return nn.Sequential(first, second)

    def extra_repr(self) -> str:
        return nn.Linear.extra_repr(self) + ", " + self._dcs_repr()


# ------------------------------------------------------------ Conv{1,2,3}d
class _DCSConvNd(DCSLayer):
    _ndim: int

    def _init_conv(self, conv_cls, args, kwargs, dcs):
        conv_cls.__init__(self, *args, **kwargs, device="meta", dtype=dcs["dtype"])
        has_bias = self._parameters.get("bias") is not None
        shape = torch.Size((self.out_channels, self.in_channels // self.groups, *self.kernel_size))
        self._setup_dcs(shape, has_bias, **dcs)
        if not has_bias:
            self._parameters["bias"] = None
        self._finish_init()

    @classmethod
    def _options_from(cls, module) -> Dict[str, Any]:
        return dict(
            in_channels=module.in_channels, out_channels=module.out_channels, kernel_size=module.kernel_size,
            stride=module.stride, padding=module.padding, dilation=module.dilation, groups=module.groups,
            bias=module.bias is not None, padding_mode=module.padding_mode,
        )

    def forward(self, input: Tensor) -> Tensor:
        weight, bias = self.weight_and_bias()
        return self._conv_forward(input, weight, bias)

    def _dense_kwargs(self) -> Dict[str, Any]:
        return dict(stride=self.stride, padding=self.padding, dilation=self.dilation, padding_mode=self.padding_mode)

    def _make_dense(self, shape, has_bias, device, dtype) -> nn.Module:
        return self._dense_cls(
            self.in_channels, self.out_channels, self.kernel_size, groups=self.groups, bias=has_bias,
            device=device, dtype=dtype, **self._dense_kwargs(),
        )

    def _thin(self, threshold, bias):
        if self.groups != 1:
            return None
        left, right = self.parametrization.thin_factors(threshold)  # (out, r), (in*k, r)
        r = left.shape[1]
        fan = right.shape[0]
        if r == 0 or r * (fan + self.out_channels) >= fan * self.out_channels:
            # (rank 0: torch's convolutions cannot have zero channels, so a dead layer exports
            # as the dense all-zero conv, which computes the same function: its bias)
            return None
        dev, dt = left.device, left.dtype
        first = self._dense_cls(self.in_channels, r, self.kernel_size, bias=False, device=dev, dtype=dt,
                                **self._dense_kwargs())
        second = self._dense_cls(r, self.out_channels, 1, bias=bias is not None, device=dev, dtype=dt)
        first.weight.copy_(right.t().reshape(first.weight.shape))
        second.weight.copy_(left.reshape(second.weight.shape))
        if bias is not None:
            second.bias.copy_(bias)
        return nn.Sequential(first, second)

    def extra_repr(self) -> str:
        return self._dense_cls.extra_repr(self) + ", " + self._dcs_repr()


def _conv_class(dense_cls, ndim):
    name = f"DCSConv{ndim}d"

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1, groups: int = 1,
        bias: bool = True, padding_mode: str = "zeros", device=None, dtype=None, *, structure: str = "elementwise",
        alpha: float = 0.0, group_dim: Optional[int] = None, rank: Optional[int] = None,
        mask: Optional[Tensor] = None, mirror: Optional[Tensor] = None, mirror_dim: Optional[int] = None,
        constrain_bias: bool = False,
    ) -> None:
        self._init_conv(
            dense_cls,
            (in_channels, out_channels, kernel_size),
            dict(stride=stride, padding=padding, dilation=dilation, groups=groups, bias=bias,
                 padding_mode=padding_mode),
            layer_options(structure, alpha, group_dim, rank, mask, mirror, mirror_dim, constrain_bias, device, dtype),
        )

    doc = (
        f"nn.Conv{ndim}d with a structured weight theta = T(factors), shape (out, in/groups, *kernel).\n\n"
        f"    Same arguments as :class:`torch.nn.Conv{ndim}d`, plus the keyword-only structure options of\n"
        f"    :mod:`symfast.nn.layers`. ``structure='group'`` groups output channels by default.\n"
    )
    return type(name, (_DCSConvNd, dense_cls), {
        "__init__": __init__, "__doc__": doc, "_dense_cls": dense_cls, "_ndim": ndim,
        "_default_group_dim": 0, "__module__": __name__, "__qualname__": name,
    })


DCSConv1d = _conv_class(nn.Conv1d, 1)
DCSConv2d = _conv_class(nn.Conv2d, 2)
DCSConv3d = _conv_class(nn.Conv3d, 3)


# -------------------------------------------------------------- Embedding
class DCSEmbedding(DCSLayer, nn.Embedding):
    r"""nn.Embedding with a structured table theta = T(factors), shape (num_embeddings, embedding_dim).

    Same arguments as :class:`torch.nn.Embedding` except ``max_norm`` (it
    renormalizes rows of the weight in place, which has no meaning for a
    computed theta) and ``sparse=True`` (the gradient reaches the factors
    through theta, densely). ``structure='group'`` groups embedding features
    (columns, ``group_dim=1``) by default; ``group_dim=0`` groups rows (tokens).
    """

    _dense_cls = nn.Embedding
    _default_group_dim = 1

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        padding_idx: Optional[int] = None,
        max_norm: Optional[float] = None,
        norm_type: float = 2.0,
        scale_grad_by_freq: bool = False,
        sparse: bool = False,
        _weight: Optional[Tensor] = None,
        _freeze: bool = False,
        device=None,
        dtype=None,
        *,
        structure: str = "elementwise",
        alpha: float = 0.0,
        group_dim: Optional[int] = None,
        rank: Optional[int] = None,
        mask: Optional[Tensor] = None,
        mirror: Optional[Tensor] = None,
        mirror_dim: Optional[int] = None,
        constrain_bias: bool = False,
    ) -> None:
        if max_norm is not None:
            raise ValueError("DCSEmbedding: max_norm is not supported (it renormalizes weight rows in place)")
        if sparse:
            raise ValueError("DCSEmbedding: sparse=True is not supported (gradients reach the factors densely)")
        if _freeze:
            raise ValueError("DCSEmbedding: _freeze=True is not supported; set requires_grad_(False) on the factors")
        if constrain_bias:
            raise ValueError("DCSEmbedding: an embedding has no bias (constrain_bias must be False)")
        nn.Embedding.__init__(
            self, num_embeddings, embedding_dim, padding_idx, max_norm, norm_type, scale_grad_by_freq, sparse,
            device="meta", dtype=dtype,
        )
        self._setup_dcs(
            torch.Size((num_embeddings, embedding_dim)), False,
            **layer_options(structure, alpha, group_dim, rank, mask, mirror, mirror_dim, False, device, dtype),
        )
        if _weight is not None:
            if _weight.shape != self._weight_shape:
                raise ValueError(
                    f"DCSEmbedding: _weight must have shape {tuple(self._weight_shape)}, got {tuple(_weight.shape)}"
                )
            self.set_weight(_weight)
        else:
            self._finish_init()

    @classmethod
    def _options_from(cls, module: nn.Embedding) -> Dict[str, Any]:
        return dict(num_embeddings=module.num_embeddings, embedding_dim=module.embedding_dim,
                    padding_idx=module.padding_idx, max_norm=module.max_norm, norm_type=module.norm_type,
                    scale_grad_by_freq=module.scale_grad_by_freq, sparse=module.sparse)

    def forward(self, input: Tensor) -> Tensor:
        return F.embedding(input, self.weight, self.padding_idx, None, self.norm_type, self.scale_grad_by_freq, False)

    def _make_dense(self, shape, has_bias, device, dtype) -> nn.Module:
        return nn.Embedding(shape[0], shape[1], padding_idx=self.padding_idx, norm_type=self.norm_type,
                            scale_grad_by_freq=self.scale_grad_by_freq, device=device, dtype=dtype)

    def _thin(self, threshold, bias):
        left, right = self.parametrization.thin_factors(threshold)  # (num, r), (dim, r)
        r = left.shape[1]
        if r * (self.num_embeddings + self.embedding_dim) >= self.num_embeddings * self.embedding_dim:
            return None
        table = nn.Embedding(self.num_embeddings, r, padding_idx=self.padding_idx, norm_type=self.norm_type,
                             scale_grad_by_freq=self.scale_grad_by_freq, device=left.device, dtype=left.dtype)
        proj = nn.Linear(r, self.embedding_dim, bias=False, device=left.device, dtype=left.dtype)
        table.weight.copy_(left)
        proj.weight.copy_(right)
        return nn.Sequential(table, proj)

    def extra_repr(self) -> str:
        return nn.Embedding.extra_repr(self) + ", " + self._dcs_repr()
