"""transformers models under symfast: DCSConv1D (GPT-2's transposed Linear), tied weights converted once,
export back to transformers' own modules, save_pretrained / from_pretrained.

Tiny GPT-2, Llama and BERT built from configs (no download)."""

import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402

import symfast  # noqa: E402
from symfast.nn import DCSEmbedding, DCSLinear, permutation_mirror  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 61


def _conv1d(nf=7, nx=5, seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    layer = Conv1D(nf, nx).to(dtype)
    with torch.no_grad():
        layer.bias.normal_()  # Conv1D starts with a zero bias: give it values the tests can see
    return layer


STRUCTURES_1D = [
    ("elementwise", {}),
    ("elementwise", {"constrain_bias": True}),
    ("group", {}),
    ("group", {"group_dim": 0}),
    ("group", {"constrain_bias": True}),
    ("group", {"group_dim": 0, "constrain_bias": True}),
    ("lowrank", {}),
    ("mirror", {"mirror": permutation_mirror(7, [(0, 1), (3, 5)], dtype=torch.float64), "mirror_dim": 1}),
]


# ---------------------------------------------------------------- DCSConv1D
@pytest.mark.parametrize("structure, options", STRUCTURES_1D, ids=lambda v: str(v) if isinstance(v, str) else
                         "-".join(f"{k}" for k in v) or "default")
def test_dcs_conv1d_is_conv1d_with_the_same_function(structure, options):
    from symfast.nn import DCSConv1D

    dense = _conv1d()
    layer = DCSConv1D.from_dense(dense, structure=structure, alpha=1e-3, **options)
    assert isinstance(layer, Conv1D) and (layer.nf, layer.nx) == (7, 5)
    assert layer.weight.shape == dense.weight.shape == (5, 7)  # the transposed layout is kept
    x = torch.randn(3, 4, 5, dtype=torch.float64)
    if structure in ("elementwise", "group"):
        assert torch.equal(layer(x), dense(x)) and torch.equal(layer.weight, dense.weight)
    else:  # through an SVD or a projection: to rounding
        torch.testing.assert_close(layer(x), dense(x), rtol=1e-12, atol=1e-12)
    back = layer.to_dense()
    assert type(back) is Conv1D
    torch.testing.assert_close(back(x), dense(x), rtol=1e-12, atol=1e-12)


def test_dcs_conv1d_groups_output_units_by_default_and_joins_the_bias_as_a_row():
    from symfast.nn import DCSConv1D

    layer = DCSConv1D.from_dense(_conv1d(), structure="group", alpha=1e-3)
    assert layer.parametrization.dim == 1 and layer.parametrization.s.shape == (7,)  # one gate per output
    joint = DCSConv1D.from_dense(_conv1d(), structure="group", alpha=1e-3, constrain_bias=True)
    assert joint.parametrization.shape == (6, 7) and joint.parametrization.dim == 1
    with torch.no_grad():
        joint.parametrization.s[2] = 0  # kill output unit 2: its weights and its bias go together
    out = joint(torch.randn(4, 5, dtype=torch.float64))
    assert torch.equal(out[:, 2], torch.zeros(4, dtype=torch.float64))
    inputs = DCSConv1D.from_dense(_conv1d(), structure="group", alpha=1e-3, group_dim=0)
    assert inputs.parametrization.s.shape == (5,) and inputs.bias_parametrization is None


def test_dcs_conv1d_fresh_layer_draws_as_conv1d():
    from symfast.nn import DCSConv1D

    torch.manual_seed(3)
    ref = Conv1D(6, 4)
    torch.manual_seed(3)
    layer = DCSConv1D(6, 4, structure="group", alpha=1e-3)
    assert torch.equal(layer.weight, ref.weight) and torch.equal(layer.bias, ref.bias)
    assert "structure=group" in repr(layer) and "nf=6, nx=4" in repr(layer)


@pytest.mark.parametrize("rank_alive", [2, 0])
def test_dcs_conv1d_lowrank_exports_two_thin_conv1d_or_a_dead_one(rank_alive):
    from symfast.nn import DCSConv1D

    torch.manual_seed(0)
    a, b = torch.randn(32, rank_alive, dtype=torch.float64), torch.randn(24, rank_alive, dtype=torch.float64)
    dense = _conv1d(nf=24, nx=32)
    with torch.no_grad():
        dense.weight.copy_(a @ b.t())
    layer = DCSConv1D.from_dense(dense, structure="lowrank", alpha=1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no zero-element init warning escapes
        exported = layer.to_dense()
    if rank_alive:
        assert isinstance(exported, nn.Sequential) and [type(m) for m in exported] == [Conv1D, Conv1D]
        assert (exported[0].nx, exported[0].nf, exported[1].nx, exported[1].nf) == (32, 2, 2, 24)
    else:  # Conv1D cannot take zero inputs: the dead layer is the zero Conv1D
        assert type(exported) is Conv1D and not exported.weight.any()
    x = torch.randn(5, 32, dtype=torch.float64)
    torch.testing.assert_close(exported(x), dense(x), rtol=1e-10, atol=1e-10)


def test_importing_symfast_does_not_import_transformers():
    code = "import sys, symfast, symfast.nn; assert 'transformers' not in sys.modules, 'imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
