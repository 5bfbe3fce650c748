"""symfast.convert, penalty, export and sparsity_report, and the converted model where users use it:
state_dict, torch.compile(fullgraph=True), autocast bfloat16 (CPU)."""

import copy
import io
import warnings

import pytest
import torch
from torch import nn

from symfast.conversion import convert, param_groups, penalty
from symfast.exporting import export, sparsity_report
from symfast.nn import DCSConv1d, DCSConv2d, DCSConv3d, DCSEmbedding, DCSLayer, DCSLinear, permutation_basis

from matrix import DEVICES

DT = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


class Net(nn.Module):
    """Every supported layer type, a few unsupported ones, and a nested Sequential."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(20, 6, padding_idx=0)
        self.conv1 = nn.Conv1d(6, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(1, 4, 3, padding=1, padding_mode="reflect")
        self.conv3 = nn.Conv3d(1, 2, 2, bias=False)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Sequential(nn.Linear(8 + 4 + 2, 16), nn.ReLU(), nn.Dropout(0.1), nn.Linear(16, 3))

    def forward(self, tokens, image, volume):
        h = self.conv1(self.embed(tokens).transpose(1, 2)).mean(dim=2)
        a = self.conv2(image).mean(dim=(2, 3))
        b = self.conv3(volume).mean(dim=(2, 3, 4))
        return self.head(torch.cat([self.norm(h), a, b], dim=1))


def _inputs(batch=5):
    g = torch.Generator().manual_seed(1)
    return (torch.randint(0, 20, (batch, 7), generator=g), torch.randn(batch, 1, 6, 6, generator=g),
            torch.randn(batch, 1, 3, 3, 3, generator=g))


def _mirror_for(name, module):
    """Permutation mirror of output units 0 and 1 of every layer (embedding: features 0 and 1)."""
    n = module.embedding_dim if isinstance(module, nn.Embedding) else module.weight.shape[0]
    dim = 1 if isinstance(module, nn.Embedding) else 0
    return permutation_basis(n, [(0, 1)], dtype=module.weight.dtype), dim


def _convert(model, structure, **kw):
    if structure == "mirror":
        kw.update(mirror=lambda n, m: _mirror_for(n, m)[0], mirror_dim=lambda n, m: _mirror_for(n, m)[1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return convert(model, structure=structure, alpha=1e-3, **kw)


STRUCTURES = ["elementwise", "group", "lowrank", "mirror"]


# ---------------------------------------------------------------- convert
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("structure", STRUCTURES)
def test_convert_keeps_the_function(structure, device):
    torch.manual_seed(0)
    model = Net().eval().to(device)
    x = tuple(t.to(device) for t in _inputs())
    expected = model(*x)
    rng = torch.get_rng_state()
    converted = _convert(model, structure)
    assert torch.equal(torch.get_rng_state(), rng), "convert must not draw random numbers"
    assert converted is model
    assert all(p.device.type == device for p in model.parameters())
    types = {type(m) for m in model.modules()}
    assert {DCSEmbedding, DCSConv1d, DCSConv2d, DCSConv3d, DCSLinear} <= types
    assert not any(type(m) in (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding) for m in model.modules())
    got = model(*x)
    if structure in ("elementwise", "group"):
        assert torch.equal(got, expected)  # the factorizations reproduce theta bit for bit
    else:
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert sorted(n for n, _, _ in model.dcs_report.converted) == ["conv1", "conv2", "conv3", "embed", "head.0",
                                                                   "head.3"]
    assert [n for n, *_ in model.dcs_report.not_converted] == ["norm"]
    # Factors off the stationary conditions: the penalty is above its minimum, strictly.
    for m in model.modules():
        if isinstance(m, DCSLayer):
            assert float(m.penalty().detach()) > float(m.convex_penalty())


def test_convert_reports_what_it_did_not_convert():
    class Custom(nn.Linear):  # a subclass may have its own forward
        def forward(self, x):
            return super().forward(x) * 2

    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.gain = nn.Parameter(torch.ones(3))

        def forward(self, x):
            return x * self.gain

    tied = nn.Embedding(10, 4)
    head = nn.Linear(4, 10, bias=False)
    head.weight = tied.weight  # weight tying
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), Custom(4, 3), Scale(), nn.Linear(3, 3), tied, head)
    with pytest.warns(UserWarning, match=r"5 module\(s\) with parameters were not converted"):
        convert(model, alpha=1e-3, exclude=["4"])
    report = model.dcs_report
    assert [c[0] for c in report.converted] == ["0"]
    reasons = {name: reason for name, _, _, reason in report.not_converted}
    assert set(reasons) == {"1", "2", "3", "5", "6"}
    assert "no DCS layer for BatchNorm1d" in reasons["1"]
    assert "subclass of nn.Linear" in reasons["2"]
    assert "no DCS layer for Scale" in reasons["3"]
    assert "shared with another module" in reasons["5"] and "shared" in reasons["6"]
    assert report.excluded == ["4"] and type(model[4]) is nn.Linear
    assert "NOT converted" in str(report) and "excluded" in str(report)
    # A conversion the structure cannot do exactly is reported, not approximated.
    with pytest.warns(UserWarning):
        m2 = convert(nn.Sequential(nn.Linear(4, 6)), structure="lowrank", rank=2, alpha=1e-3)
    assert "rank=2" in m2.dcs_report.not_converted[0][3] and type(m2[0]) is nn.Linear


def test_convert_filters_and_root_module():
    model = nn.Sequential(nn.Linear(3, 4), nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)))
    convert(model, alpha=1e-3, include=["1"], exclude=lambda name, m: name == "1.1", warn=False)
    assert [type(m).__name__ for m in (model[0], model[1][0], model[1][1])] == ["Linear", "DCSLinear", "Linear"]
    convert(model, alpha=1e-3, include=nn.Linear, warn=False)  # types work too; DCS layers are left alone
    assert all(isinstance(m, DCSLinear) for m in (model[0], model[1][0], model[1][1]))
    root = nn.Linear(3, 2)
    new = convert(root, structure="group", alpha=0.1)
    assert isinstance(new, DCSLinear) and new.dcs_report.converted == [("", "Linear", "DCSLinear")]


def test_transformer_layer_and_pickling():
    """Attention's out_proj (read through .weight by F.multi_head_attention_forward) converts; the
    attention's own in_proj parameters and the norms are reported; the whole model pickles."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.0, batch_first=True).eval()
    x = torch.randn(3, 5, 16)
    expected = layer(x)
    with torch.no_grad():
        expected_fast = layer(x)  # torch's fused inference path (other rounding)
    with pytest.warns(UserWarning, match="MultiheadAttention x 1"):
        convert(layer, alpha=1e-3)
    assert isinstance(layer.self_attn.out_proj, DCSLinear) and isinstance(layer.linear1, DCSLinear)
    assert torch.equal(layer(x), expected)
    with torch.no_grad():  # the fused inference path reads .weight too
        assert torch.equal(layer(x), expected_fast)
    buf = io.BytesIO()
    torch.save(layer, buf)
    buf.seek(0)
    again = torch.load(buf, weights_only=False)
    assert torch.equal(again(x), expected)


def test_conv_with_bias_in_the_group():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    with torch.no_grad():
        conv.weight[2] = 0
        conv.bias[2] = 0
    model = nn.Sequential(conv, nn.ReLU(), nn.Conv2d(4, 2, 3, padding=1))
    x = torch.randn(2, 3, 5, 5)
    expected = model(x)
    convert(model, structure="group", alpha=1e-3, constrain_bias=True, include=["0"])
    assert model[0]._bias_mode == "joint" and torch.equal(model(x), expected)
    assert int(model[0].parametrization.dead_groups().sum()) == 1
    exported = export(model)
    assert exported[0].out_channels == 3 and exported[2].in_channels == 3  # zero constant: removable
    torch.testing.assert_close(exported(x), expected, rtol=1e-6, atol=1e-6)


def test_penalty_is_the_sum_over_layers():
    torch.manual_seed(0)
    model = _convert(Net(), "group")
    layers = [m for m in model.modules() if isinstance(m, DCSLayer)]
    expected = sum(float(m.penalty()) for m in layers)
    assert abs(float(penalty(model)) - expected) < 1e-6
    manual = sum(1e-3 * float(p.pow(2).sum()) for m in layers for p in m.parametrization.penalized_parameters())
    assert abs(float(penalty(model)) - manual) < 1e-6
    assert float(penalty(Net())) == 0.0


# ----------------------------------------------------------------- export
@pytest.mark.parametrize("structure", STRUCTURES)
def test_export_keeps_the_function_and_is_plain_torch(structure):
    torch.manual_seed(0)
    model = _convert(Net().eval(), structure)
    x = _inputs()
    expected = model(*x)
    exported = export(model)
    assert not any(isinstance(m, DCSLayer) for m in exported.modules())
    assert any(isinstance(m, DCSLayer) for m in model.modules())  # the model itself is untouched
    if structure in ("elementwise", "group"):
        assert torch.equal(exported(*x), expected)
    else:
        torch.testing.assert_close(exported(*x), expected, rtol=1e-5, atol=1e-6)


def _trained_to_sparsity(model, x, y, steps, lr):
    opt = torch.optim.SGD(param_groups(model), lr=lr, momentum=0.9)
    for _ in range(steps):
        opt.zero_grad()
        (model(x) - y).pow(2).mean().backward()
        opt.step()
    return model


def test_export_thresholds_to_exact_zeros():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(128, 10, generator=g)
    y = x[:, :3] @ torch.tensor([[1.0], [-2.0], [0.5]])
    model = _convert(nn.Sequential(nn.Linear(10, 1, bias=False)), "elementwise")
    model[0].alpha = 0.02
    _trained_to_sparsity(model, x, y, steps=300, lr=0.05)
    theta = model[0].weight.detach()
    small = theta.abs() <= 1e-3
    assert 0 < int(small.sum()) < theta.numel() and bool((theta[small] != 0).any())  # small but not all zero
    exported = export(model, threshold=1e-3)
    w = exported[0].weight.detach()
    assert torch.equal(w == 0, small)
    assert torch.equal(w[~small], theta[~small])
    bound = float(theta[small].abs().sum()) * float(x.abs().max())
    assert float((exported(x) - model(x)).abs().max()) <= bound + 1e-6
    report = sparsity_report(model, threshold=1e-3)
    assert report.rows[0]["zeros"] == int((w == 0).sum()) and "zeros" in str(report)


def _dead_units_model(constrain_bias):
    """Linear -> ReLU -> BN -> Dropout -> Linear -> Tanh -> Linear, group over output units,
    with units 1 and 4 of the first layer and unit 2 of the second dead."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.BatchNorm1d(5), nn.Dropout(0.2), nn.Linear(5, 4),
                          nn.Tanh(), nn.Linear(4, 2))
    with torch.no_grad():
        model[0].weight[[1, 4]] = 0
        model[4].weight[2] = 0
        model[2].running_mean.uniform_(-0.5, 0.5)
        model[2].running_var.uniform_(0.5, 2.0)
        model[2].weight.uniform_(0.5, 1.5)
        model[2].bias.uniform_(-0.5, 0.5)
        if constrain_bias:
            model[0].bias[[1, 4]] = 0
            model[4].bias[2] = 0
    model.eval()
    return _convert(model, "group", constrain_bias=constrain_bias)


@pytest.mark.parametrize("constrain_bias", [False, True])
def test_group_export_removes_dead_units(constrain_bias):
    model = _dead_units_model(constrain_bias)
    x = torch.randn(9, 6)
    expected = model(x)
    exported = export(model)
    assert [exported[0].out_features, exported[2].num_features, exported[4].in_features] == [3, 3, 3]
    assert [exported[4].out_features, exported[6].in_features] == [3, 3]
    # A dead unit with a nonzero bias is a constant; it is folded into the next layer's bias.
    torch.testing.assert_close(exported(x), expected, rtol=1e-6, atol=1e-6)
    report = sparsity_report(model)
    rows = {r["name"]: r for r in report.rows}
    assert rows["0"]["dead_groups"] == 2 and rows["4"]["dead_groups"] == 1
    extra = 1 if constrain_bias else 0  # the bias column of the joint group
    assert rows["0"]["params_export"] == 3 * 6 + 3 and rows["0"]["params_dense"] == 5 * 6 + 5
    assert rows["0"]["params_train"] == 5 * (6 + extra) + 5 + (0 if constrain_bias else 5)
    assert report.totals["params_export"] < report.totals["params_dense"]


def test_embedding_features_export():
    """Dead embedding features (group over columns) go, with the next Linear's matching inputs."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 6), nn.Linear(6, 3))
    with torch.no_grad():
        model[0].weight[:, [1, 4]] = 0
    model = _convert(model, "group")
    assert model[0].group_dim == 1
    tokens = torch.randint(0, 10, (4, 5))
    exported = export(model)
    assert exported[0].embedding_dim == 4 and exported[1].in_features == 4
    torch.testing.assert_close(exported(tokens), model(tokens), rtol=1e-6, atol=1e-6)


def test_group_over_inputs_removes_the_previous_layers_outputs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.GELU(), nn.Linear(6, 3)).eval()
    with torch.no_grad():
        model[2].weight[:, [0, 3, 5]] = 0  # features 0, 3, 5 unused by the second layer
    model = _convert(model, "group", group_dim=lambda name, m: 1)
    x = torch.randn(7, 4)
    exported = export(model)
    assert exported[0].out_features == 3 and exported[2].in_features == 3
    torch.testing.assert_close(exported(x), model(x), rtol=1e-6, atol=1e-6)
    # Input features of the first layer cannot go (that would change the model's input).
    assert exported[0].in_features == 4


def test_conv_export_keeps_channels_a_zero_padding_would_see():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.BatchNorm2d(4), nn.Conv2d(4, 3, 3, padding=1),
                          nn.Conv2d(3, 2, 1)).eval()
    with torch.no_grad():
        model[0].weight[1] = 0  # dead channel, bias > 0 after ReLU: a nonzero constant ...
        model[0].bias[1] = 0.7
        model[0].weight[2] = 0  # ... and one whose constant is exactly 0
        model[0].bias[2] = -0.3  # ReLU(-0.3) = 0, and this BN channel maps 0 to 0
        model[2].running_mean[2] = 0.0
        model[2].bias[2] = 0.0
        model[3].weight[1] = 0  # dead output channel feeding a 1x1 conv without padding: foldable
        model[3].bias[1] = 0.4
    model = _convert(model, "group")
    x = torch.randn(2, 2, 7, 7)
    exported = export(model)
    # Channel 1 of the first conv stays (its constant would meet the next conv's zero padding at the
    # border); channel 2 goes (constant 0); channel 1 of the second conv folds into the 1x1 conv.
    assert exported[0].out_channels == 3 and exported[3].in_channels == 3
    assert exported[3].out_channels == 2 and exported[4].in_channels == 2
    torch.testing.assert_close(exported(x), model(x), rtol=1e-5, atol=1e-5)


def test_lowrank_exports_two_thin_layers_when_smaller():
    torch.manual_seed(0)
    dense = nn.Linear(40, 30)
    with torch.no_grad():
        dense.weight.copy_(torch.randn(30, 3) @ torch.randn(3, 40))
    model = _convert(nn.Sequential(dense, nn.ReLU()), "lowrank")
    x = torch.randn(5, 40)
    exported = export(model)
    thin = exported[0]
    assert isinstance(thin, nn.Sequential) and [thin[0].out_features, thin[1].in_features] == [3, 3]
    torch.testing.assert_close(exported[0](x), model[0](x), rtol=1e-5, atol=1e-5)
    row = sparsity_report(model).rows[0]
    assert row["rank"] == 3 and row["full_rank"] == 30 and row["params_export"] == 3 * 70 + 30
    # Full rank stays one layer.
    full = _convert(nn.Sequential(nn.Linear(6, 5)), "lowrank")
    assert type(export(full)[0]) is nn.Linear
    conv = _convert(nn.Sequential(nn.Conv2d(8, 16, 3)), "lowrank")
    with torch.no_grad():
        lo = torch.randn(16, 2) @ torch.randn(2, 72)
        conv[0].set_weight(lo.view(16, 8, 3, 3), conv[0].bias)
    xc = torch.randn(2, 8, 6, 6)
    ex = export(conv)
    assert isinstance(ex[0], nn.Sequential) and ex[0][0].out_channels == 2
    torch.testing.assert_close(ex(xc), conv(xc), rtol=1e-5, atol=1e-5)



@pytest.mark.parametrize("dead", [(0,), (2,), (0, 2)])
def test_lowrank_export_of_a_dead_layer_is_rank_zero(dead):
    """A low-rank layer whose every singular value is below the threshold exports as
    two width-0 layers (only the bias is left), inside or at the end of a chain,
    with the same function and no warning."""
    import warnings

    torch.manual_seed(0)
    model = _convert(nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)), "lowrank")
    with torch.no_grad():
        for i in dead:
            for p in model[i].parametrization.parameters():
                p.zero_()
    x = torch.randn(4, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        exported = export(model, threshold=1e-6)
    torch.testing.assert_close(exported(x), model(x), rtol=0, atol=1e-6)
    rows = sparsity_report(model).rows
    for i in dead:
        assert rows[i // 2]["rank"] == 0
    widths = [m.out_features for m in exported.modules() if isinstance(m, nn.Linear)]
    assert widths.count(0) == len(dead)  # one width-0 thin layer per dead layer


# ------------------------------------------------------ where users work
@pytest.mark.parametrize("structure", STRUCTURES)
def test_state_dict_round_trip_is_bit_exact(structure):
    torch.manual_seed(0)
    model = _convert(Net(), structure)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    torch.manual_seed(1)  # another model, other values
    other = _convert(Net(), structure)
    buf.seek(0)
    other.load_state_dict(torch.load(buf))
    for (n, a), (_, b) in zip(model.state_dict().items(), other.state_dict().items()):
        assert torch.equal(a, b), n
    model.eval(), other.eval()
    x = _inputs()
    assert torch.equal(model(*x), other(*x))


def test_compile_fullgraph_of_a_converted_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(),
                          nn.Linear(8, 2))
    model = _convert(model, "elementwise", include=["0"])
    model = convert(model, structure="group", alpha=1e-3, include=["2"], warn=False)
    model = convert(model, structure="lowrank", alpha=1e-3, include=["4"], warn=False)
    model = convert(model, structure="mirror", alpha=1e-3, include=["6"], warn=False,
                       mirror=permutation_basis(2, [(0, 1)]), mirror_dim=0)
    x = torch.randn(4, 6)
    compiled = torch.compile(model, fullgraph=True)

    def step(m):
        m.zero_grad()
        loss = m(x).pow(2).sum() + penalty(model)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    loss_e, grads_e = step(model)
    loss_c, grads_c = step(compiled)
    torch.testing.assert_close(loss_c, loss_e)
    for a, b in zip(grads_c, grads_e):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("structure", STRUCTURES)
def test_autocast_bfloat16_on_cpu(structure):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Conv1d(1, 2, 3, padding=1))

    class Wrap(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner[2](self.inner[1](self.inner[0](x)).unsqueeze(1))

    dense = Wrap(model)
    converted = Wrap(copy.deepcopy(model))
    _convert(converted, structure)
    x = torch.randn(8, 16)
    exact = dense(x).detach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = dense(x)
        got = converted(x)
    assert got.dtype == torch.bfloat16
    if structure in ("elementwise", "group"):
        # theta is the original weight bit for bit, so autocast rounds the same numbers the same way.
        assert torch.equal(got, want)
    else:
        # theta goes through a matmul, which autocast runs in bfloat16 too: the low-precision rule
        # (error against full precision at most twice that of the plain model under autocast).
        err = float((got.float() - exact).abs().max())
        assert err <= 2 * float((want.float() - exact).abs().max()) + 1e-3
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = converted(x).float().pow(2).mean() + penalty(converted)
    loss.backward()
    grads = [p.grad for p in converted.parameters()]
    assert all(g is not None and g.dtype == torch.float32 and bool(torch.isfinite(g).all()) for g in grads)


# ----------------------------------------- what convert must not change silently
def _one_linear():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 3, dtype=DT), nn.ReLU(), nn.Linear(3, 2, dtype=DT))


def _hooked(m):
    m[0].register_forward_hook(lambda mod, inp, out: 2 * out)


def _pruned(m):
    import torch.nn.utils.prune as prune

    prune.l1_unstructured(m[0], "weight", amount=0.5)


def _child(m):
    m[0].adapter = nn.Linear(3, 3, dtype=DT)


def _buffer(m):
    m[0].register_buffer("scale", torch.ones(3, dtype=DT))


def _frozen(m):
    m[0].weight.requires_grad_(False)


@pytest.mark.parametrize("change,reason", [(_hooked, "hooks"), (_pruned, "hooks"), (_child, "child modules"),
                                           (_buffer, "buffers"), (_frozen, "frozen")])
def test_convert_leaves_what_it_would_change_and_says_why(change, reason):
    """A DCS layer is rebuilt from constructor arguments, weight and bias: hooks (prune is
    one), children, buffers and a frozen weight would be lost or changed silently."""
    model = _one_linear()
    change(model)
    x = torch.randn(4, 5, dtype=DT)
    before = model(x)
    with pytest.warns(UserWarning, match="not converted"):
        convert(model, structure="group", alpha=1e-3)
    (entry,) = model.dcs_report.not_converted
    assert entry[0] == "0" and reason in entry[3]
    assert type(model[0]) is nn.Linear and isinstance(model[2], DCSLinear)
    torch.testing.assert_close(model(x), before, atol=0, rtol=0)


def test_convert_keeps_a_frozen_bias_frozen_and_the_users_attributes():
    model = _one_linear()
    model[0].bias.requires_grad_(False)
    model[0].tag = "encoder"
    convert(model, structure="elementwise", alpha=1e-3, warn=False)
    assert isinstance(model[0], DCSLinear)
    assert model[0].bias.requires_grad is False and model[0].tag == "encoder"
    with pytest.warns(UserWarning, match="not converted"):  # under constrain_bias it would become trainable
        frozen = _one_linear()
        frozen[0].bias.requires_grad_(False)
        convert(frozen, structure="elementwise", alpha=1e-3, constrain_bias=True)
    assert "bias is frozen" in frozen.dcs_report.not_converted[0][3]


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(alpha=-1.0), ValueError, "alpha"),
    (dict(alpha=float("nan")), ValueError, "alpha"),
    (dict(alpha=None), TypeError, "alpha"),
    (dict(alpha="x"), TypeError, "alpha"),
    (dict(alpha=1e-3, include=5), TypeError, "include"),
    (dict(alpha=1e-3, exclude=[3.0]), TypeError, "exclude"),
    (dict(alpha=1e-3, rank=2), ValueError, "rank= applies to structure='lowrank'"),
    (dict(alpha=1e-3, group_dim={"0": 1, "fc_1": 1}), ValueError, r"group_dim= names no supported layer.*fc_1"),
    (dict(alpha=1e-3, structure="mirror", constrain_bias=True), ValueError, "constrain_bias"),
])
def test_convert_rejects_bad_options_before_converting_anything(kwargs, error, match):
    model = _one_linear()
    kwargs = {"structure": "group", **kwargs}
    with pytest.raises(error, match=match):
        convert(model, **kwargs)
    assert type(model[0]) is nn.Linear and type(model[2]) is nn.Linear  # untouched


def test_constrain_bias_constrains_the_weight_of_layers_without_a_bias():
    model = nn.Sequential(nn.Linear(5, 3, bias=False, dtype=DT), nn.Linear(3, 2, dtype=DT))
    x = torch.randn(4, 5, dtype=DT)
    before = model(x)
    convert(model, structure="group", alpha=1e-3, constrain_bias=True, warn=False)
    assert [e[0] for e in model.dcs_report.converted] == ["0", "1"]
    assert model[0]._bias_mode == "free" and model[1]._bias_mode == "joint"
    torch.testing.assert_close(model(x), before, atol=0, rtol=0)


def test_a_layer_used_twice_is_selected_by_all_its_names():
    shared = nn.Linear(4, 4, dtype=DT)
    for kwargs, converted in ((dict(exclude="b.*"), False), (dict(include="b.*"), True)):
        model = nn.Module()
        model.a = shared
        model.b = nn.Sequential(shared, nn.Linear(4, 2, dtype=DT))
        convert(model, structure="elementwise", alpha=1e-3, warn=False, **kwargs)
        assert isinstance(model.a, DCSLinear) is converted and model.a is model.b[0]


def test_parametrized_and_lazy_layers_are_reported_as_such():
    class Twice(nn.Module):
        def forward(self, w):
            return 2 * w

    model = nn.Sequential(nn.Linear(4, 3), nn.LazyLinear(2))
    torch.nn.utils.parametrize.register_parametrization(model[0], "weight", Twice())
    convert(model, structure="elementwise", alpha=1e-3, warn=False)
    reasons = {e[0]: e[3] for e in model.dcs_report.not_converted}
    assert set(reasons) == {"0", "1"}  # and not the ParametrizationList inside 0
    assert "parametrize" in reasons["0"] and "lazy" in reasons["1"]


def test_convert_on_meta_then_materialize():
    """A model built on meta converts (nothing to factor yet); to_empty + reset_parameters
    then draws and factors a fresh theta, as torch's own layers do."""
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(5, 3), nn.ReLU(), nn.Linear(3, 2))
    for structure in STRUCTURES:
        m = convert(copy.deepcopy(model), structure=structure, alpha=1e-3, warn=False,
                    **({"mirror": _mirror_for} if structure == "mirror" else {}))
        assert m[0].weight.is_meta
        m = m.to_empty(device="cpu")
        for layer in (m[0], m[2]):
            layer.reset_parameters()
        assert torch.isfinite(m(torch.randn(2, 5))).all()


# ----------------------------------------------------------- export edge cases
def test_export_keeps_a_layer_used_twice_shared():
    layer = nn.Linear(16, 16, dtype=DT)
    model = convert(nn.Sequential(nn.Linear(4, 16, dtype=DT), layer, layer), structure="group", alpha=1e-3,
                    warn=False)
    small = export(model)
    assert small[1] is small[2] and type(small[1]) is nn.Linear
    x = torch.randn(3, 4, dtype=DT)
    torch.testing.assert_close(small(x), model(x))
    assert sum(p.numel() for p in small.parameters()) == 4 * 16 + 16 + 16 * 16 + 16


def test_export_warns_when_it_folds_through_batch_norm_in_train_mode():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6, dtype=DT), nn.BatchNorm1d(6, dtype=DT), nn.ReLU(), nn.Linear(6, 2, dtype=DT))
    model[1].running_mean.uniform_(-1, 1)
    model = convert(model, structure="group", alpha=1e-3, warn=False)
    with torch.no_grad():
        model[0].parametrization.s[1] = 0  # unit 1 is dead: its constant goes through the batch norm
    with pytest.warns(UserWarning, match="eval mode only"):
        export(model)
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        small = export(model)
    x = torch.randn(5, 4, dtype=DT)
    torch.testing.assert_close(small(x), model(x))
    assert small[0].out_features == 5


@pytest.mark.parametrize("bad,error", [(float("nan"), ValueError), (-1.0, ValueError), (None, TypeError),
                                       ("0.1", TypeError)])
def test_export_and_report_reject_bad_thresholds(bad, error):
    model = convert(_one_linear(), structure="group", alpha=1e-3, warn=False)
    for fn in (export, sparsity_report):
        with pytest.raises(error, match="threshold"):
            fn(model, threshold=bad)


@pytest.mark.parametrize("fn", [penalty, export, param_groups, sparsity_report])
def test_model_functions_name_a_non_module(fn):
    with pytest.raises(TypeError, match=r"model must be an nn.Module, got list"):
        fn([nn.Linear(2, 2)])


def test_sparsity_report_of_a_group_with_its_bias_describes_the_weight():
    model = convert(_one_linear(), structure="group", alpha=1e-3, constrain_bias=True, warn=False)
    with torch.no_grad():
        model[0].parametrization.s[0] = 0
    row = sparsity_report(model, compute_rank=True).rows[0]
    assert row["shape"] == (3, 5) and row["numel"] == 15 and row["zeros"] == 5
    assert row["rank"] == 2 and row["dead_groups"] == 1


@pytest.mark.parametrize("conv", [nn.Conv1d, nn.Conv2d])
def test_lowrank_export_of_a_dead_conv_runs(conv):
    """torch's convolutions cannot have zero channels: a rank-0 conv exports as the dense
    all-zero conv (its bias), not as two thin convs of width 0 that fail in forward."""
    torch.manual_seed(0)
    model = convert(nn.Sequential(conv(3, 4, 3, padding=1, dtype=DT)), structure="lowrank", alpha=1e-3, warn=False)
    small = export(model, threshold=1e9)
    assert type(small[0]) is conv and not small[0].weight.any()
    x = torch.randn(2, 3, *([8] * (2 if conv is nn.Conv2d else 1)), dtype=DT)
    expected = model[0].bias.detach().reshape(1, 4, *([1] * (x.dim() - 2))).expand(2, 4, *x.shape[2:])
    torch.testing.assert_close(small(x), expected, atol=0, rtol=0)
