"""symfast.nn: the DCS layers and structures.

Layers start from the function torch's layer would have (same random numbers),
`.weight` is theta through the structure's op, factorizations are exact and
lie off every stationary condition, and (the paper's central point) trained
coordinates can change sign and dead groups revive, which the balanced or
zero-gate factorizations provably cannot (checked here too, so the tests can
fail).
"""

import math

import pytest
import torch
from torch import nn

from symfast.conversion import penalty
from symfast.nn import (
    DCSConv1d,
    DCSConv2d,
    DCSConv3d,
    DCSEmbedding,
    DCSLinear,
    Elementwise,
    Group,
    LowRank,
    MirrorStructure,
    permutation_basis,
)
from symfast import reference

from matrix import DEVICES

DT = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")

# (dcs class, torch class, constructor args, input maker)
LAYERS = {
    "linear": (DCSLinear, nn.Linear, (7, 5), lambda: torch.randn(4, 7)),
    "conv1d": (DCSConv1d, nn.Conv1d, (3, 4, 3), lambda: torch.randn(2, 3, 9)),
    "conv2d": (DCSConv2d, nn.Conv2d, (3, 4, (3, 2)), lambda: torch.randn(2, 3, 6, 5)),
    "conv3d": (DCSConv3d, nn.Conv3d, (2, 3, 2), lambda: torch.randn(2, 2, 4, 4, 3)),
    "embedding": (DCSEmbedding, nn.Embedding, (11, 5), lambda: torch.randint(0, 11, (3, 4))),
}


def _mirror_options(kind):
    out = LAYERS[kind][2][1] if kind != "embedding" else LAYERS[kind][2][0]
    return {"mirror": permutation_basis(out, [(0, 1)]), "mirror_dim": 0}


STRUCTURE_OPTIONS = {
    "elementwise": lambda kind: {},
    "group": lambda kind: {},
    "lowrank": lambda kind: {},
    "mirror": _mirror_options,
}
BIT_EXACT = ("elementwise", "group")


# ------------------------------------------------------------ construction
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("structure", list(STRUCTURE_OPTIONS))
@pytest.mark.parametrize("kind", list(LAYERS))
def test_fresh_layer_is_the_torch_layer(kind, structure, device):
    """Same seed, same theta and bias as torch's layer; same outputs; .weight is theta, not a parameter."""
    dcs_cls, torch_cls, args, make_input = LAYERS[kind]
    torch.manual_seed(0)
    dense = torch_cls(*args, device=device)
    torch.manual_seed(0)
    options = {k: v.to(device) if isinstance(v, torch.Tensor) else v
               for k, v in STRUCTURE_OPTIONS[structure](kind).items()}
    layer = dcs_cls(*args, structure=structure, alpha=1e-3, device=device, **options)
    assert isinstance(layer, torch_cls)
    assert all(p.device.type == device for p in layer.parameters())
    x = make_input().to(device)
    if structure in BIT_EXACT:
        assert torch.equal(layer.weight, dense.weight)
        assert torch.equal(layer(x), dense(x))
    else:
        torch.testing.assert_close(layer.weight, dense.weight, rtol=0, atol=2e-6)
        torch.testing.assert_close(layer(x), dense(x), rtol=1e-5, atol=1e-5)
    if kind != "embedding":
        assert torch.equal(layer.bias, dense.bias) and isinstance(layer.bias, nn.Parameter)
    names = dict(layer.named_parameters())
    assert "weight" not in names and not isinstance(layer.weight, nn.Parameter)
    assert all(n.startswith("parametrization.") or n == "bias" for n in names)
    # .weight is differentiable: a loss through it reaches the factors.
    layer.weight.sum().backward()
    assert all(p.grad is not None for n, p in layer.named_parameters() if n.startswith("parametrization."))
    assert f"structure={structure}" in repr(layer) and "alpha=0.001" in repr(layer)


def test_device_dtype_keywords_and_options():
    layer = DCSLinear(4, 3, dtype=DT, device="cpu", structure="group", group_dim=1, alpha=0.5)
    assert layer.weight.dtype == DT and layer.bias.dtype == DT
    assert layer.parametrization.s.shape == (4,) and layer.group_dim == 1
    layer.alpha = 0.25
    assert layer.parametrization.alpha == 0.25 and "alpha=0.25" in repr(layer)
    assert DCSLinear(6, 4, structure="lowrank", rank=2).parametrization.a.shape == (4, 2)
    assert DCSEmbedding(5, 3, structure="group").group_dim == 1  # embedding features by default
    assert DCSConv2d(2, 4, 3, structure="group").parametrization.s.shape == (4,)  # output channels


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(structure="sparse"), "structure must be one of"),
        (dict(structure="elementwise", rank=2), "rank has no meaning"),
        (dict(structure="group", group_dim=2), "group_dim must be"),
        (dict(structure="lowrank", rank=9), "rank must be an int in"),
        (dict(structure="mirror"), "needs mirror=O"),
        (dict(structure="mirror", mirror=torch.eye(5)[:, :2], constrain_bias=True), "constrain_bias"),
        (dict(alpha=-1.0), "alpha must be"),
    ],
)
def test_bad_options_are_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DCSLinear(4, 5, **kwargs)


def test_mirror_validates_O():
    bad = torch.eye(5)[:, :2] * 1.3
    with pytest.raises(ValueError, match=r"O must have orthonormal columns.*max \|O\^T O - I\| = 0\.69"):
        DCSLinear(4, 5, structure="mirror", mirror=bad, mirror_dim=0)
    with pytest.raises(ValueError, match=r"O must have shape \(n, k\) with n = theta.numel\(\) = 20"):
        DCSLinear(4, 5, structure="mirror", mirror=torch.eye(5)[:, :2])
    with pytest.raises(ValueError, match="disjoint"):
        permutation_basis(4, [(0, 1), (1, 2)])
    O = permutation_basis(4, [(0, 1), (2, 3)], dtype=DT)
    torch.testing.assert_close(O.t() @ O, torch.eye(2, dtype=DT))
    theta = torch.randn(4, 3, dtype=DT)
    torch.testing.assert_close(O.t() @ theta, (theta[[0, 2]] - theta[[1, 3]]) / math.sqrt(2))


def test_embedding_rejects_in_place_and_sparse_options():
    with pytest.raises(ValueError, match="max_norm"):
        DCSEmbedding(5, 3, max_norm=1.0)
    with pytest.raises(ValueError, match="sparse"):
        DCSEmbedding(5, 3, sparse=True)


# -------------------------------------------------- exact factorizations
def _awkward_theta(shape, dtype, seed=0):
    """Random theta with exact zeros, a zero row, and perfect squares (where w = u = sqrt(theta) would fit)."""
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(shape, generator=g, dtype=torch.float64)
    flat = theta.view(-1)
    flat[::5] = 0
    flat[1::7] = 0.25
    flat[2::7] = -4.0
    theta[1] = 0  # a dead row (output unit)
    return theta.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_elementwise_and_group_factorizations_are_bit_exact_and_off_the_mirrors(dtype):
    theta = _awkward_theta((6, 9), dtype)
    e = Elementwise(theta.shape, alpha=0.1, dtype=dtype)
    e.set_theta(theta)
    assert torch.equal(e(), theta)
    w, u = e.w.detach().double(), e.u.detach().double()
    # Off both mirrors w = u and w = -u everywhere, including theta = 0 and theta = 0.25.
    assert bool((w.abs() > u.abs()).all())
    for dim in (0, 1):
        g = Group(theta.shape, alpha=0.1, dim=dim, dtype=dtype)
        g.set_theta(theta)
        assert torch.equal(g(), theta)
        s = g.s.detach().double()
        norms = g.w.detach().double().pow(2).sum(dim=1 - dim).sqrt()
        assert bool((s > 0).all()) and bool((s > norms).all())  # no zero gate; off s = +-|w|

    mask = torch.rand(theta.shape) > 0.5
    e = Elementwise(theta.shape, alpha=0.1, mask=mask, dtype=dtype)
    e.set_theta(theta)
    assert torch.equal(e(), theta)
    # Off the mask the factors are 0 (and get no gradient): the penalty counts the constrained coordinates only.
    assert bool((e.w.detach()[~mask] == 0).all()) and bool((e.u.detach()[~mask] == 0).all())
    assert bool((e.w.detach()[mask].abs() > e.u.detach()[mask].abs()).all())


def test_lowrank_and_mirror_factorizations_are_exact_and_off_the_mirrors():
    theta = _awkward_theta((6, 9), DT)
    theta[3] = theta[0] + theta[2]  # rank deficient: 4 of 6 (row 1 is zero too)
    lr = LowRank(theta.shape, alpha=0.1, dtype=DT)
    lr.set_theta(theta)
    torch.testing.assert_close(lr(), theta, rtol=0, atol=1e-14)
    # A has full column rank: no direction n with A n = B n = 0 (the rank could not grow there).
    assert float(torch.linalg.svdvals(lr.a.detach()).min()) > 1e-3
    gram = lr.a.detach().t() @ lr.a.detach() - lr.b.detach().t() @ lr.b.detach()
    torch.testing.assert_close(gram, gram.diagonal().mean() * torch.eye(6, dtype=DT))  # A^T A - B^T B = tau I
    with pytest.raises(ValueError, match="rank 4 .* but rank=3"):
        LowRank(theta.shape, rank=3, dtype=DT).set_theta(theta)

    for O, dim in [(permutation_basis(6, [(0, 1), (2, 4)], dtype=DT), 0),
                   (torch.linalg.qr(torch.randn(54, 7, dtype=DT)).Q, None)]:
        m = MirrorStructure(theta.shape, alpha=0.1, O=O, dim=dim, dtype=DT)
        m.set_theta(theta)
        torch.testing.assert_close(m(), theta, rtol=0, atol=1e-14)
        a, b = m.coordinates(m.w.detach()), m.coordinates(m.u.detach())
        assert bool((a.abs() > b.abs()).all())


def test_penalty_minimum_is_the_convex_penalty():
    """Over random factorizations of one theta, the penalty is >= the convex one, with equality when balanced."""
    theta = torch.randn(5, 4, dtype=DT)
    for p in [Elementwise((5, 4), alpha=0.3, dtype=DT), Group((5, 4), alpha=0.3, dim=1, dtype=DT),
              LowRank((5, 4), alpha=0.3, dtype=DT),
              MirrorStructure((5, 4), alpha=0.3, O=permutation_basis(5, [(0, 3)], dtype=DT), dim=0, dtype=DT)]:
        p.set_theta(theta)
        convex = float(p.convex_penalty())
        assert float(p.penalty()) >= convex - 1e-12
        with torch.no_grad():  # rebalance by hand: the penalty meets the convex one
            if isinstance(p, Elementwise):
                r = (p.u.abs() / p.w.abs()).sqrt()
                p.w.mul_(r), p.u.div_(r)
            elif isinstance(p, Group):
                norms = p.w.norm(dim=0)
                r = (norms / p.s.abs()).sqrt()
                p.s.mul_(r), p.w.div_(r)
            elif isinstance(p, LowRank):
                U, S, Vh = torch.linalg.svd(theta, full_matrices=False)
                p.a.copy_(U * S.sqrt()), p.b.copy_(Vh.t() * S.sqrt())
            else:
                a, b = p.coordinates(p.w), p.coordinates(p.u)
                r = (b.abs() / a.abs()).sqrt()
                p.w.copy_(p.lift(a * r)), p.u.copy_(p.lift(b / r))
        torch.testing.assert_close(p(), theta)
        assert abs(float(p.penalty()) - convex) < 1e-12


def test_group_structure_uses_the_fused_gate_op():
    """theta of the group structure is the fused dcs_group op, equal to its reference and to w * s."""
    for dim in range(3):
        g = Group((4, 5, 3), alpha=0.1, dim=dim, dtype=DT)
        g.set_theta(torch.randn(4, 5, 3, dtype=DT))
        shape = [1, 1, 1]
        shape[dim] = -1
        theta = g()
        assert torch.equal(theta, g.w * g.s.view(shape))
        assert torch.equal(theta, reference.dcs_group(g.w, g.s, dim))
        assert theta.grad_fn is not None and "DCSGroupFunction" in theta.grad_fn.name()


# ------------------------------------------------- bias under the constraint
def test_constrained_bias():
    torch.manual_seed(0)
    dense = nn.Linear(5, 4)
    joint = DCSLinear.from_dense(dense, structure="group", alpha=0.1, constrain_bias=True)
    assert joint._bias_mode == "joint" and "bias" not in dict(joint.named_parameters())
    x = torch.randn(3, 5)
    assert torch.equal(joint(x), dense(x)) and torch.equal(joint.bias, dense.bias)
    # theta_g = [W_g | b_g]: the penalty's minimum is 2 alpha sum_g |[W_g, b_g]|.
    aug = torch.cat([dense.weight, dense.bias[:, None]], dim=1).detach().double()
    torch.testing.assert_close(joint.convex_penalty().double(), 0.2 * aug.norm(dim=1).sum())
    elem = DCSLinear.from_dense(dense, structure="lowrank", alpha=0.1, constrain_bias=True)
    assert elem._bias_mode == "elementwise" and isinstance(elem.bias_parametrization, Elementwise)
    torch.testing.assert_close(elem(x), dense(x))


# ----------------------------------------------- leaving a coordinate's sign
def _fit(layer, X, y, steps, lr):
    params = [p for p in layer.parameters()]
    for _ in range(steps):
        loss = 0.5 * (layer(X) - y).pow(2).sum(dim=1).mean() + penalty(layer)
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for p, g in zip(params, grads):
                p.sub_(lr * g)
    return layer.weight.detach()


def test_trained_coordinates_change_sign():
    """Converted from theta0 (some entries > 0, some 0), trained on data that wants the opposite signs.

    From the converted factors every coordinate reaches the data's sign (and
    the zeros come alive). From the balanced factorization w = u = sqrt(theta0),
    which lies on the mirror w = u, the positive coordinates never become
    negative: that is the stationary condition the conversion avoids.
    """
    g = torch.Generator().manual_seed(0)
    X = torch.randn(200, 6, generator=g, dtype=DT)
    theta0 = torch.tensor([[0.5, 0.2, 0.25, 0.0, 0.0, 1.0]], dtype=DT)
    target = torch.tensor([[-1.0, -0.5, -0.8, 1.0, -1.0, 1.0]], dtype=DT)
    y = X @ target.t()
    dense = nn.Linear(6, 1, bias=False, dtype=DT)
    with torch.no_grad():
        dense.weight.copy_(theta0)
    layer = DCSLinear.from_dense(dense, structure="elementwise", alpha=1e-4)
    theta = _fit(layer, X, y, steps=1500, lr=0.1)
    assert torch.equal(torch.sign(theta), torch.sign(target)), theta
    torch.testing.assert_close(theta, target, atol=1e-3, rtol=0)

    stuck = DCSLinear.from_dense(dense, structure="elementwise", alpha=1e-4)
    with torch.no_grad():
        stuck.parametrization.w.copy_(theta0.sqrt())
        stuck.parametrization.u.copy_(theta0.sqrt())
    theta = _fit(stuck, X, y, steps=1500, lr=0.1)
    assert bool((theta[theta0 > 0] >= 0).all()) and bool((theta[theta0 == 0] == 0).all())


@pytest.mark.parametrize("group_dim", [0, 1])
def test_dead_groups_revive(group_dim):
    """A dead group (theta_g = 0) converts to s_g > 0, w_g = 0 and comes back when the data asks for it.

    With the zero gate s_g = w_g = 0 (the group mirror's fixed point) it stays dead.
    """
    g = torch.Generator().manual_seed(1)
    X = torch.randn(200, 5, generator=g, dtype=DT)
    target = torch.randn(3, 5, generator=g, dtype=DT)
    y = X @ target.t()
    theta0 = target.clone()
    if group_dim == 0:
        theta0[1] = 0  # dead output unit
    else:
        theta0[:, 2] = 0  # dead input feature
    dense = nn.Linear(5, 3, bias=False, dtype=DT)
    with torch.no_grad():
        dense.weight.copy_(theta0 * 0.5)
    layer = DCSLinear.from_dense(dense, structure="group", group_dim=group_dim, alpha=1e-4)
    assert bool(layer.parametrization.dead_groups().any())
    theta = _fit(layer, X, y, steps=800, lr=0.1)
    assert not bool(layer.parametrization.dead_groups(1e-3).any())
    torch.testing.assert_close(theta, target, atol=2e-3, rtol=0)

    stuck = DCSLinear.from_dense(dense, structure="group", group_dim=group_dim, alpha=1e-4)
    dead = stuck.parametrization.dead_groups()
    with torch.no_grad():
        stuck.parametrization.s[dead] = 0
    theta = _fit(stuck, X, y, steps=800, lr=0.1)
    assert bool(stuck.parametrization.dead_groups()[dead].all())  # exactly zero, forever


# ------------------------------------------------------- autograd and memory
@pytest.mark.parametrize("structure", list(STRUCTURE_OPTIONS))
def test_layer_gradcheck(structure):
    """float64 gradcheck of the layer's output with respect to all its parameters."""
    options = {"mirror": permutation_basis(3, [(0, 2)], dtype=DT), "mirror_dim": 0} if structure == "mirror" else {}
    torch.manual_seed(0)
    layer = DCSLinear(4, 3, dtype=DT, structure=structure, alpha=0.1, **options)
    x = torch.randn(2, 4, dtype=DT)
    names, params = zip(*layer.named_parameters())

    def f(*ps):
        return torch.func.functional_call(layer, dict(zip(names, ps)), (x,))

    assert torch.autograd.gradcheck(f, tuple(p.detach().clone().requires_grad_() for p in params))


def _saved_bytes(fn):
    """Bytes of the distinct storages autograd saves for backward while running fn."""
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, storages


@pytest.mark.parametrize("structure", ["elementwise", "group", "lowrank", "mirror"])
def test_saved_for_backward_is_no_larger_than_the_factors(structure):
    """Computing theta saves no more bytes than the factors; elementwise, group and lowrank save only the
    factors themselves (no new memory at all)."""
    options = {"mirror": permutation_basis(128, [(0, 1), (2, 3)]), "mirror_dim": 0} if structure == "mirror" else {}
    layer = DCSLinear(256, 128, structure=structure, alpha=1e-3, **options)
    factors = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes()
               for p in layer.parametrization.parameters()}
    _, saved = _saved_bytes(layer.parametrization)
    assert sum(saved.values()) <= sum(factors.values())
    if structure != "mirror":  # the mirror saves its (k x rest) projections O^T w, O^T u
        assert set(saved) <= set(factors), "the op saved a tensor that is not a factor"


# ------------------------------------------------------------- edge cases of set-up
def test_mirror_conversion_is_exact_to_the_weights_rounding():
    """O is stored as its nearest exactly orthonormal matrix in the weights' dtype, so that a
    float32 O in a float64 model, or an O off by 1e-4, leaves no error of that size."""
    torch.manual_seed(0)
    dense = nn.Linear(6, 8, dtype=torch.float64)
    O32 = permutation_basis(8, [(0, 1), (2, 3)], dtype=torch.float32)  # 1/sqrt(2) in float32
    layer = DCSLinear.from_dense(dense, structure="mirror", mirror=O32, mirror_dim=0, alpha=1e-3)
    assert layer.parametrization.O.dtype == torch.float64
    torch.testing.assert_close(layer.weight, dense.weight, atol=1e-14, rtol=0)

    dense32 = nn.Linear(6, 8)
    Q = torch.linalg.qr(torch.randn(48, 5, dtype=torch.float64)).Q.float() * (1 + 1.5e-4)  # within float32's tolerance
    layer = DCSLinear.from_dense(dense32, structure="mirror", mirror=Q, alpha=1e-3)
    scale = dense32.weight.abs().max()
    torch.testing.assert_close(layer.weight, dense32.weight, atol=4 * torch.finfo(torch.float32).eps * float(scale), rtol=0)


def test_group_dim_1_of_a_grouped_conv_is_an_error():
    """Dim 1 of a grouped conv's weight is the input channel within a group: one gate there
    would tie channel c of every group together."""
    with pytest.raises(ValueError, match=r"group_dim=1 .* grouped convolution \(groups=2\)"):
        DCSConv2d(4, 6, 3, groups=2, structure="group", group_dim=1)
    DCSConv2d(4, 6, 3, groups=2, structure="group", group_dim=0)  # output channels: fine
    with pytest.raises(ValueError, match="group_dim must be an int"):
        DCSLinear(4, 3, structure="group", group_dim=True)


def test_an_integer_0_1_mask_is_a_mask():
    mask = torch.tensor([[1, 0, 1]] * 2)
    layer = DCSLinear(3, 2, structure="elementwise", mask=mask)
    assert layer.parametrization.mask.dtype == torch.bool
    with pytest.raises(ValueError, match="torch.int64 tensor with other values"):
        DCSLinear(3, 2, structure="elementwise", mask=2 * mask)


@pytest.mark.parametrize("structure", ["elementwise", "elementwise-mask", "group", "lowrank", "mirror"])
def test_layers_on_meta_then_to_empty(structure):
    """Built on meta, then to_empty + reset_parameters: the same layer as one built directly
    (same random numbers), including its constant buffers (mask, O), which to_empty leaves
    uninitialized."""
    kw = dict(mirror=permutation_basis(3, [(0, 1)]), mirror_dim=0) if structure == "mirror" else {}
    if structure == "elementwise-mask":
        structure, kw = "elementwise", dict(mask=torch.tensor([True, False, True, True, False]))
    layer = DCSLinear(5, 3, device="meta", structure=structure, **kw)
    assert layer.weight.is_meta and layer.weight.shape == (3, 5)
    layer = layer.to_empty(device="cpu")
    torch.manual_seed(0)
    layer.reset_parameters()
    torch.manual_seed(0)
    ref = DCSLinear(5, 3, structure=structure, **kw)
    torch.testing.assert_close(layer.weight, ref.weight, atol=0, rtol=0)
    for name, buf in ref.parametrization.named_buffers():
        torch.testing.assert_close(layer.parametrization.get_buffer(name), buf, atol=0, rtol=0)
