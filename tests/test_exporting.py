"""symfast.export's sparse inference option, and its errors on a model whose training diverged."""

import warnings

import pytest
import torch
from torch import nn

from symfast import convert, export, sparsity_report
from symfast.nn import SparseLinear

pytestmark = pytest.mark.usefixtures("one_thread")


def _mlp(structure="elementwise", zeros=(0.95, 0.5, 0.0), seed=0):
    """A converted MLP whose three Linear layers have the given fractions of zeros."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 5)).double()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        convert(model, structure=structure, alpha=1e-3)
    with torch.no_grad():
        for layer, frac in zip((model[0], model[2], model[4]), zeros):
            theta = layer.weight
            layer.set_weight(theta * (torch.rand_like(theta) >= frac), layer.bias)
    return model.eval()


@pytest.mark.parametrize("fmt, blocksize", [("csr", None), ("bsr", (2, 2))])
def test_sparse_export_swaps_the_sparse_linears_and_keeps_the_function(fmt, blocksize):
    model = _mlp()
    x = torch.randn(7, 32, dtype=torch.float64)
    with torch.no_grad():
        ref = model(x)
    sparse = export(model, sparse_format=fmt, sparse_blocksize=blocksize)
    # only the layer with >= 90% zeros (the default sparse_min_sparsity) becomes sparse
    assert [type(m).__name__ for m in sparse] == ["SparseLinear", "ReLU", "Linear", "ReLU", "Linear"]
    assert sparse[0].sparse_format == fmt
    if fmt == "csr":
        assert sparse[0].nnz() == int((model[0].weight != 0).sum())
    with torch.no_grad():
        torch.testing.assert_close(sparse(x), ref, rtol=1e-12, atol=1e-12)  # another summation order
    half = export(model, sparse_format=fmt, sparse_blocksize=blocksize, sparse_min_sparsity=0.4)
    assert [type(m).__name__ for m in half][::2] == ["SparseLinear", "SparseLinear", "Linear"]
    assert all(type(m) is not SparseLinear for m in export(model).modules())  # opt-in only


@pytest.mark.parametrize("kwargs, match", [
    (dict(sparse_format="coo"), "sparse_format must be None or one of"),
    (dict(sparse_format="csr", sparse_min_sparsity=1.5), r"sparse_min_sparsity must be a number in \[0, 1\]"),
    (dict(sparse_format="csr", sparse_blocksize=(8, 8)), "sparse_blocksize applies to sparse_format='bsr' only"),
    (dict(sparse_format="bsr", sparse_blocksize=(0, 8)), r"SparseLinear.from_dense\(0\): blocksize must be"),
])
def test_sparse_export_rejects_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        export(_mlp(), **kwargs)


def test_bsr_export_leaves_a_layer_its_blocks_do_not_divide_dense_and_says_so():
    model = _mlp()
    with pytest.warns(UserWarning, match=r"left 0 \(\d+, 32\) dense: the block size \(7, 7\) does not divide"):
        sparse = export(model, sparse_format="bsr", sparse_blocksize=(7, 7))
    assert type(sparse[0]) is nn.Linear


@pytest.mark.parametrize("structure", ["elementwise", "group", "lowrank"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_export_and_sparsity_report_say_a_diverged_run_diverged(structure, value):
    model = _mlp(structure, zeros=(0.0, 0.0, 0.0))
    factor = model[2].parametrization.penalized_parameters()[0]
    with torch.no_grad():
        factor.view(-1)[3] = value
    for fn in (export, sparsity_report):
        with pytest.raises(ValueError, match=rf"symfast.{fn.__name__}: layer 2 \(DCSLinear\) has 1 non-finite "
                                             r"values .* in parametrization\.\w+: the training run diverged"):
            fn(model)


def test_a_diverged_plain_layer_is_named_too():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        convert(model, alpha=1e-3, exclude=["2"])
    with torch.no_grad():
        model[1].running_var[0] = float("nan")
    with pytest.raises(ValueError, match=r"layer 1 \(BatchNorm1d\) .* in running_var: the training run diverged"):
        export(model)
