"""symfast.nn.SparseLinear: an nn.Linear with a torch sparse weight, for inference."""

import copy
import io

import pytest
import torch
from torch import nn

from symfast.nn import SparseLinear

from matrix import DEVICES

pytestmark = pytest.mark.usefixtures("one_thread")


def _sparse_linear(in_f=48, out_f=32, sparsity=0.9, bias=True, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    layer = nn.Linear(in_f, out_f, bias=bias)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(out_f, in_f, generator=g) * (torch.rand(out_f, in_f, generator=g) >= sparsity))
        if bias:
            layer.bias.copy_(torch.randn(out_f, generator=g))
    return layer.to(device=device, dtype=dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fmt", ["csr", "bsr"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(5, 48), (2, 3, 48), (0, 48), (48,)], ids=str)
def test_sparse_linear_computes_the_linear(device, fmt, bias, shape):
    dense = _sparse_linear(bias=bias, dtype=torch.float64, device=device)
    sparse = SparseLinear.from_dense(dense, sparse_format=fmt, blocksize=(8, 8) if fmt == "bsr" else None)
    assert sparse.weight.layout == {"csr": torch.sparse_csr, "bsr": torch.sparse_bsr}[fmt]
    x = torch.randn(shape, dtype=torch.float64, device=device)
    with torch.no_grad():
        ref = dense(x)
        out = sparse(x)
    assert out.shape == ref.shape
    # float64: the sparse product sums in another order, so only rounding differs
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    # the weight's values are the dense layer's, and the layer gives the dense one back exactly
    back = sparse.to_dense()
    assert type(back) is nn.Linear and torch.equal(back.weight, dense.weight)
    assert (back.bias is None) == (not bias) and (not bias or torch.equal(back.bias, dense.bias))


def test_csr_stores_only_the_nonzeros_and_float32_is_within_rounding():
    dense = _sparse_linear(in_f=256, out_f=128, sparsity=0.95)
    sparse = SparseLinear.from_dense(dense)
    assert sparse.nnz() == int((dense.weight != 0).sum())
    x = torch.randn(16, 256)
    with torch.no_grad():
        ref64 = dense.double()(x.double())
        err_sparse = (sparse(x).double() - ref64).abs().max()
        err_dense = (dense.float()(x).double() - ref64).abs().max()
    # the flash-attention rule: at most twice the dense float32 error (plus one ulp of the output scale)
    assert err_sparse <= 2 * err_dense + torch.finfo(torch.float32).eps * ref64.abs().max()


def test_sparse_linear_survives_deepcopy_save_and_dtype_moves():
    dense = _sparse_linear()
    model = nn.Sequential(SparseLinear.from_dense(dense), nn.ReLU())
    x = torch.randn(4, 48)
    with torch.no_grad():
        ref = model(x)
        torch.testing.assert_close(copy.deepcopy(model)(x), ref, rtol=0, atol=0)
        buf = io.BytesIO()
        torch.save(model, buf)
        buf.seek(0)
        torch.testing.assert_close(torch.load(buf, weights_only=False)(x), ref, rtol=0, atol=0)
        assert model.double()(x.double()).dtype == torch.float64


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(sparse_format="coo"), ValueError, "sparse_format must be one of"),
    (dict(sparse_format="bsr", blocksize=(5, 8)), ValueError, r"blocksize must be two positive ints dividing"),
    (dict(sparse_format="csr", blocksize=(8, 8)), ValueError, "blocksize applies to sparse_format='bsr' only"),
    (dict(sparse_format="bsr", blocksize=(8, 16)), ValueError, "on the CPU a bsr blocksize must be square"),
    (dict(sparse_format="semi_structured"), ValueError, "runs on CUDA only"),
])
def test_bad_options_are_clear_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        SparseLinear.from_dense(_sparse_linear(), name="head.fc", **kwargs)


def test_from_dense_names_what_it_got():
    with pytest.raises(TypeError, match=r"expected an nn.Linear, got Conv1d"):
        SparseLinear.from_dense(nn.Conv1d(2, 2, 1))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="semi-structured 2:4 sparsity needs CUDA")
def test_semi_structured_needs_a_2_4_pattern():  # pragma: no cover - CUDA only
    dense = _sparse_linear(in_f=128, out_f=128, sparsity=0.0, dtype=torch.float16, device="cuda")
    with pytest.raises(ValueError, match="not 2:4 sparse"):
        SparseLinear.from_dense(dense, sparse_format="semi_structured")
    with torch.no_grad():
        dense.weight.view(128, -1, 4)[..., 2:] = 0  # keep 2 of every 4
    sparse = SparseLinear.from_dense(dense, sparse_format="semi_structured")
    x = torch.randn(64, 128, dtype=torch.float16, device="cuda")
    with torch.no_grad():
        torch.testing.assert_close(sparse(x), dense(x), rtol=1e-2, atol=1e-2)
