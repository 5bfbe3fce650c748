"""Indexing past 2^31 elements: dcs and dcs_group, forward and backward, on bfloat16
tensors of just over 2^31 elements (4 GiB each), against closed forms.

Opt-in (``SYMFAST_LARGE_TESTS=1``): the dcs cases need about 16 GB of memory at their
peak, so ``make test`` skips them. Run before each release:

    SYMFAST_LARGE_TESTS=1 python -m pytest -q tests/test_large_tensors.py

The inputs hold position-dependent values (i mod 251, or a step at element 2^31), so an
index that wraps at 2^31 or 2^32, or a part of the output left unwritten, changes a
result. Values and expectations are built and compared in chunks, so that no int64 or
float32 copy of a whole tensor is needed.
"""

import os

import pytest
import torch

import symfast

pytestmark = pytest.mark.skipif(
    os.environ.get("SYMFAST_LARGE_TESTS") != "1",
    reason="needs about 16 GB of memory; set SYMFAST_LARGE_TESTS=1 to run",
)

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device"))]

B = 2**31
N = B + 2**20 + 3  # past 2^31 by more than a grain of work, with an odd tail
CHUNK = 2**26
ROWS, COLS = 32769, 65552  # dcs_group's weight, ROWS * COLS > 2^31
BF16 = torch.bfloat16


def _chunks(n):
    for a in range(0, n, CHUNK):
        yield a, min(a + CHUNK, n)


def _index_mod(a, b, device):
    """i mod 251 for i in [a, b), as float32: exact, and at most 250, so exact in bfloat16."""
    return (torch.arange(a, b, device=device) % 251).float()


def _pattern(n, device):
    """The bfloat16 tensor of i mod 251 for i in [0, n)."""
    t = torch.empty(n, dtype=BF16, device=device)
    for a, b in _chunks(n):
        t[a:b] = _index_mod(a, b, device).to(BF16)
    return t


def _mask(n, device):
    """mask[i] = (i mod 251) is odd."""
    m = torch.empty(n, dtype=torch.bool, device=device)
    for a, b in _chunks(n):
        m[a:b] = _index_mod(a, b, device) % 2 == 1
    return m


def _assert_matches(out, expected_chunk):
    """out[a:b] equals expected_chunk(a, b) bit for bit, chunk by chunk."""
    assert out.numel() == N and out.dtype == BF16
    flat = out.reshape(-1)
    for a, b in _chunks(N):
        got, want = flat[a:b], expected_chunk(a, b)
        if not torch.equal(got, want):
            bad = (got != want).nonzero()[0].item() + a
            raise AssertionError(f"element {bad}: got {flat[bad].item()}, expected {want[bad - a].item()}")


def _squared(a, b, device, masked=False):
    """bfloat16((i mod 251)^2), the product of two bfloat16 values rounded once; 0 where the
    mask is off."""
    k = _index_mod(a, b, device)
    sq = (k * k).to(BF16)
    return torch.where(k % 2 == 1, sq, torch.zeros_like(sq)) if masked else sq


@pytest.mark.parametrize("device", DEVICES)
def test_dcs_forward_and_backward_past_2_31(device):
    w = _pattern(N, device)
    mask = _mask(N, device)
    theta = symfast.dcs(w, w, mask=mask)  # m ? w * w : 0
    _assert_matches(theta, lambda a, b: _squared(a, b, device, masked=True))
    del theta
    # grad = w: grad_w = m * u * grad and grad_u = m * w * grad are both w^2 where m is on.
    gw, gu, gv = torch.ops.symfast.dcs_backward(w, w, w, mask, True, True, False)
    assert gv.numel() == 0
    for g in (gw, gu):
        _assert_matches(g, lambda a, b: _squared(a, b, device, masked=True))


def _step(rows, cols, device):
    """A (rows, cols) bfloat16 tensor that is 1 before flat element 2^31 and 2 from it on."""
    w = torch.ones(rows * cols, dtype=BF16, device=device)
    w[B:] = 2
    return w.view(rows, cols)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dim", [0, 1])
def test_dcs_group_forward_and_backward_past_2_31(device, dim):
    rows, cols = ROWS, COLS  # dim 1: one group per column (inner = 1); dim 0: one per row
    assert rows * cols > B
    w = _step(rows, cols, device)
    groups = w.shape[dim]
    s = (torch.arange(groups, device=device) % 251).to(BF16)
    gate_shape = (groups, 1) if dim == 0 else (1, groups)
    s_b = s.float().view(gate_shape)

    def scaled(a, b):  # rows [a, b) of w * s: products of powers of two and integers <= 250, exact
        return (w[a:b].float() * (s_b[a:b] if dim == 0 else s_b)).to(BF16)

    chunk_rows = CHUNK // cols

    def check_rows(out):
        assert out.shape == w.shape
        for a in range(0, rows, chunk_rows):
            b = min(a + chunk_rows, rows)
            assert torch.equal(out[a:b], scaled(a, b)), f"rows {a}:{b}"

    check_rows(symfast.dcs_group(w, s, dim))
    # grad = w: grad_w = w * s, and grad_s[g] = sum of w^2 over group g, an integer count of
    # ones (flat index < 2^31) and fours, exact in float32 sums (< 2^24).
    gw, gs = torch.ops.symfast.dcs_group_backward(w, w, s, dim, True, True)
    check_rows(gw)
    del gw
    g = torch.arange(groups, device=device, dtype=torch.int64)
    if dim == 1:  # group = column c: rows r with r * cols + c < 2^31
        ones = ((B - g + cols - 1) // cols).clamp(0, rows)
        size = rows
    else:  # group = row r: columns c with r * cols + c < 2^31
        ones = (B - g * cols).clamp(0, cols)
        size = cols
    expected = (ones + 4 * (size - ones)).float().to(BF16)
    assert torch.equal(gs, expected)
