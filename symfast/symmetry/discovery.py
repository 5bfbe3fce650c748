r"""``find_symmetries``: proposes the mirrors of a model from its structure and keeps those that
pass a numerical check, reporting every check it made."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch
import torch.func as tf
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten

from .layout import ParamLayout, flat_values
from .mirror import Mirror
from .constructors import permutation_mirror, rotation_mirror, unit_permutation_mirror, unit_sign_mirror
from .dcs_probe import computed_weight, dcs_candidates
from .verification import condition_rtol, default_rtol

__all__ = ["find_symmetries", "SymmetryReport", "SymmetryFinding", "SymmetryCheck"]


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


class _Prober:
    """Checks candidate families of mirrors of one model and sorts them into found and rejected.

    Every member is checked at two points, the model's current parameters and a random
    perturbation of them (each parameter plus Gaussian noise of its own RMS), so that a check is
    not vacuous when the model already sits on the stationary condition. One seeded generator
    draws the perturbation and every random member, in the order the families are proposed.
    """

    def __init__(self, model: nn.Module, args: Tuple[Any, ...], n_checks: int, rtol: Optional[float], seed: int):
        self.model, self.args, self.n_checks, self.seed = model, args, n_checks, seed
        self.params = {n: p.detach() for n, p in model.named_parameters()}
        self.layout = ParamLayout.of(self.params)
        self.generator = torch.Generator().manual_seed(seed)
        self.cuda_devices = sorted({p.device.index or 0 for p in self.params.values() if p.device.type == "cuda"})
        base = self.outputs(self.params)
        self.out_dtype = base[0].dtype if base else torch.float32
        self.rtol = default_rtol(self.out_dtype) if rtol is None else float(rtol)
        noisy = {}
        for n, p in self.params.items():
            s = p.double().pow(2).mean().sqrt().item() if p.numel() else 0.0
            noisy[n] = p + (s if s > 0 else 0.1) * torch.randn(p.shape, generator=self.generator, dtype=torch.float64).to(p)
        self.points = [(label, p, out, flat_values(p).double().norm().item())
                       for label, p, out in (("current parameters", self.params, base),
                                             ("perturbed parameters", noisy, self.outputs(noisy)))]
        self.found: List[SymmetryFinding] = []
        self.rejected: List[SymmetryFinding] = []

    def outputs(self, p: Dict[str, Tensor]) -> List[Tensor]:
        # identical random streams for both runs (dropout and the like in mode="train")
        with torch.no_grad(), torch.random.fork_rng(devices=self.cuda_devices):
            torch.manual_seed(self.seed)
            return _output_leaves(tf.functional_call(self.model, p, self.args))

    def checks_of(self, m: Mirror) -> List[SymmetryCheck]:
        res = []
        for label, p, out, pnorm in self.points:
            out2 = self.outputs(m.reflect(p))
            dev = max(((a.double() - b.double()).abs().max().item() for a, b in zip(out, out2) if a.numel()), default=0.0)
            scale = max((a.double().abs().max().item() for a in out if a.numel()), default=0.0)
            cond = m.condition(p).double().norm().item()
            res.append(SymmetryCheck(m.description, label, dev, dev / scale if scale > 0 else (0.0 if dev == 0 else math.inf),
                                     self.rtol, dev <= self.rtol * scale,
                                     cond <= condition_rtol(self.out_dtype) * max(pnorm, 1e-30)))
        return res

    def add_family(self, kind: str, mods: Tuple[str, ...], desc: str, size: Union[int, str],
                   build: Callable[..., Mirror], members: List[Tuple[Any, ...]], note: str = "") -> None:
        """Checks ``build(*member)`` for every member; the family is found when every check passes
        and not every check is vacuous."""
        cks: List[SymmetryCheck] = []
        first = None
        try:
            for member in members:
                m = build(*member)
                first = first or m
                cks += self.checks_of(m)
        except Exception as e:  # a candidate that cannot even be applied is rejected, with the reason
            self.rejected.append(SymmetryFinding(kind, mods, desc, size, False, cks, first, build, f"error: {e}"))
            return
        ok = bool(cks) and all(c.passed for c in cks) and not all(c.vacuous for c in cks)
        if not ok:
            bad = [c for c in cks if not c.passed]
            note = (f"{len(bad)} of {len(cks)} checks failed" if bad else "every check was vacuous (R theta = theta)")
        (self.found if ok else self.rejected).append(SymmetryFinding(kind, mods, desc, size, ok, cks, first, build, note))

    def pairs(self, h: int) -> List[Tuple[int, int]]:
        """(0, 1) and random distinct pairs of ``range(h)``: ``n_checks`` of them, or all there are."""
        out = [(0, 1)]
        while len(out) < min(self.n_checks, h * (h - 1) // 2):
            i, j = torch.randperm(h, generator=self.generator)[:2].tolist()
            if (min(i, j), max(i, j)) not in out:
                out.append((min(i, j), max(i, j)))
        return out

    def units(self, h: int) -> List[Tuple[int]]:
        """Unit 0 and random distinct units of ``range(h)``, ``n_checks`` at most."""
        if not h:
            return []
        order = list(dict.fromkeys([0] + torch.randperm(h, generator=self.generator).tolist()))
        return [(j,) for j in order[:self.n_checks]]

    def directions(self, h: int, k: int) -> List[Tuple[Tensor]]:
        """``k`` random unit vectors of dimension ``h`` (float64)."""
        out = []
        for _ in range(k):
            n = torch.randn(h, generator=self.generator, dtype=torch.float64)
            out.append((n / n.norm(),))
        return out


def _full_name(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _hidden_unit_parameters(order: List[str], modules: Dict[str, nn.Module], ia: int, ib: int, h: int):
    """The per-unit parameters of the hidden space between the linear layers ``order[ia]`` -> ``order[ib]``.

    A's run along dim 0 (weight rows, bias, DCS factors, gates); B's along dim 1 for weight-shaped
    tensors and dim 0 for the input-side factor of a low-rank W = a b^T; and the 1-D per-unit
    parameters of modules run between them (a LayerNorm's). Returns ``(pa, pb, between)`` as lists
    of ``(parameter name, dim)``.
    """
    na, nb = order[ia], order[ib]
    A, B = modules[na], modules[nb]
    wb = tuple(B.weight.shape)
    pa = [(_full_name(na, n), 0) for n, p in A.named_parameters() if p.dim() >= 1 and p.shape[0] == h]
    pb = [(_full_name(nb, n), 1) for n, p in B.named_parameters()
          if p.dim() == 2 and p.shape[1] == h and tuple(p.shape) == wb]
    pb += [(_full_name(nb, n), 0) for n, p in B.named_parameters()
           if p.dim() == 2 and p.shape[0] == h and tuple(p.shape) != wb]
    between = []
    for name in order[ia + 1: ib]:
        if name.startswith(na + ".") or (nb and name.startswith(nb + ".")):
            continue
        for n, p in modules[name].named_parameters(recurse=False):
            if p.dim() == 1 and p.shape[0] == h:
                between.append((_full_name(name, n), 0))
    return pa, pb, list(dict.fromkeys(between))


def _linear_families(prober: _Prober, order: List[str], modules: Dict[str, nn.Module]) -> None:
    """Hidden-unit permutations, sign flips and double rotations between consecutive linear layers."""
    layout = prober.layout
    linear_calls = [i for i, n in enumerate(order) if _is_linear_like(modules[n])]
    seen = set()
    for ia, ib in zip(linear_calls, linear_calls[1:]):
        na, nb = order[ia], order[ib]
        h = modules[na].out_features
        if (na, nb) in seen or modules[nb].in_features != h or na == nb:
            continue
        seen.add((na, nb))
        pa, pb, between = _hidden_unit_parameters(order, modules, ia, ib, h)
        mods = (na, nb)
        if not pa or not pb:
            prober.rejected.append(SymmetryFinding(
                "permutation", mods, f"hidden units between {na} and {nb}", h, False, [], None,
                note=f"no per-unit parameters found in {na if not pa else nb}; not checked"))
            continue
        incoming = pa + between
        if h >= 2:
            prober.add_family("permutation", mods, f"swap hidden units i <-> j between {na} and {nb} (h = {h})",
                              h * (h - 1) // 2, functools.partial(unit_permutation_mirror, layout, incoming, pb),
                              prober.pairs(h))
        prober.add_family("sign", mods, f"sign flip of one hidden unit between {na} and {nb}", h,
                          functools.partial(unit_sign_mirror, layout, pa, pb), prober.units(h),
                          note="no nonlinearity (or an odd one) between the layers")
        prober.add_family("rotation", mods, f"double rotation W_{nb} R, R W_{na} of the {h}-dim hidden space",
                          "continuous (O(h))", functools.partial(rotation_mirror, layout, pa + pb),
                          prober.directions(h, min(prober.n_checks, 2)), note="linear factorization")


class _AttentionHeads:
    """The per-head parameter axes of one ``nn.MultiheadAttention`` and the mirrors built on them."""

    def __init__(self, layout: ParamLayout, name: str, m: nn.MultiheadAttention):
        self.layout = layout
        self.prefix = f"{name}." if name else ""
        self.embed_dim, self.heads = m.embed_dim, m.num_heads
        self.head_dim = self.embed_dim // self.heads
        self.has_bias = (self.prefix + "in_proj_bias") in layout.names
        self.packed = m._qkv_same_embed_dim

    def axes(self, which: int, head: int) -> list:
        """Axis specs (rotated dim = the head dim) of q (0), k (1) or v (2) for one head."""
        E, hd, pre = self.embed_dim, self.head_dim, self.prefix
        packed_rows = slice(which * E + head * hd, which * E + (head + 1) * hd)
        local = slice(head * hd, (head + 1) * hd)
        if self.packed:
            out = [(pre + "in_proj_weight", packed_rows, 0)]
        else:
            out = [(pre + ("q_proj_weight", "k_proj_weight", "v_proj_weight")[which], local, 0)]
        if self.has_bias:
            out.append((pre + "in_proj_bias", packed_rows, 0))
        extra = pre + ("", "bias_k", "bias_v")[which]
        if which > 0 and extra in self.layout.names:
            out.append((extra, (0, 0, local), 0))
        return out

    def out_columns(self, head: int) -> Tuple[str, Tuple[slice, slice]]:
        hd = self.head_dim
        return self.prefix + "out_proj.weight", (slice(None), slice(head * hd, (head + 1) * hd))

    def query_key_rotation(self, head: int, n: Tensor) -> Mirror:
        m = rotation_mirror(self.layout, self.axes(0, head) + self.axes(1, head), n)
        m.description = f"query/key rotation of head {head}"
        return m

    def value_output_rotation(self, head: int, n: Tensor) -> Mirror:
        m = rotation_mirror(self.layout, self.axes(2, head) + [(*self.out_columns(head), 1)], n)
        m.description = f"value/output rotation of head {head}"
        return m

    def head_group(self, head: int) -> list:
        """Every parameter slice that belongs to one head (its q, k, v rows and output columns)."""
        out = [(spec[0], spec[1]) for which in range(3) for spec in self.axes(which, head)]
        out.append(self.out_columns(head))
        return out

    def head_swap(self, a: int, b: int) -> Mirror:
        m = permutation_mirror(self.layout, self.head_group(a), self.head_group(b))
        m.description = f"swap attention heads {a} <-> {b}"
        return m


def _attention_families(prober: _Prober, order: List[str], modules: Dict[str, nn.Module]) -> None:
    """Per-head query/key and value/output rotations and head permutations of ``nn.MultiheadAttention``."""
    for name in dict.fromkeys(order):
        m = modules[name]
        if not isinstance(m, nn.MultiheadAttention):
            continue
        heads = _AttentionHeads(prober.layout, name, m)
        H, hd, where = heads.heads, heads.head_dim, name or "model"
        drawn = [0] + torch.randperm(H, generator=prober.generator).tolist()
        checked = list(dict.fromkeys(drawn))[:max(1, min(prober.n_checks, H))]
        prober.add_family("attention-qk-rotation", (name,), f"rotation R of one head's query/key space in {where} (q R, k R)",
                          f"continuous (O({hd}) per head, {H} heads)", heads.query_key_rotation,
                          [(head, d) for head, (d,) in zip(checked, prober.directions(hd, len(checked)))])
        prober.add_family("attention-vo-rotation", (name,), f"rotation of one head's value/output space in {where}",
                          f"continuous (O({hd}) per head, {H} heads)", heads.value_output_rotation,
                          [(head, d) for head, (d,) in zip(checked, prober.directions(hd, len(checked)))])
        if H >= 2:
            prober.add_family("head-permutation", (name,), f"swap two attention heads in {where}", H * (H - 1) // 2,
                              heads.head_swap, prober.pairs(H))


def _dcs_families(prober: _Prober, order: List[str], modules: Dict[str, nn.Module]) -> None:
    """The factor mirrors of modules whose weight is computed from their parameters (DCS layers)."""
    for name in dict.fromkeys(order):
        m = modules[name]
        if isinstance(m, nn.MultiheadAttention) or not computed_weight(m):
            continue
        for cand, ok_weight, dev in dcs_candidates(m, f"{name}." if name else "", prober.seed):
            mirror = cand.mirror.with_layout(prober.layout)
            if not ok_weight:
                prober.rejected.append(SymmetryFinding(
                    cand.kind, (name,), cand.description, 1, False, [], mirror,
                    note=f"changes {name}.weight (max deviation {dev:.2g}); not checked further"))
                continue
            prober.add_family(cand.kind, (name,), cand.description, 1, functools.partial(_same, mirror), [()],
                              note="DCS factor mirror")


def _same(mirror: Mirror) -> Mirror:
    return mirror


def _find(model: nn.Module, args: Tuple[Any, ...], n_checks: int, rtol: Optional[float], seed: int, mode: str) -> SymmetryReport:
    modules = dict(model.named_modules())
    order = _call_order(model, args)
    prober = _Prober(model, args, n_checks, rtol, seed)
    _linear_families(prober, order, modules)
    _attention_families(prober, order, modules)
    _dcs_families(prober, order, modules)
    return SymmetryReport(prober.found, prober.rejected, mode, prober.rtol,
                          f"perturbation: each parameter + N(0, rms^2), seed {seed}")
