"""Benchmarks of sparse inference: a 4096 x 4096 Linear, unstructured sparse, dense vs torch's sparse layouts.

What ``symfast.export(model, sparse_format=...)`` buys at inference: the
forward of one Linear(4096, 4096) (float32, with bias) whose weight has 70, 80,
90, 95 or 99% zeros in a uniformly random pattern (what the lasso leaves), for batch
1, 4, 16 and 64 (rows of x), in these implementations:

* ``dense``      - ``nn.Linear`` with the zeros stored (the baseline);
* ``csr``        - :class:`symfast.nn.SparseLinear` with ``sparse_format="csr"``:
  ``(W_csr @ x^T)^T``, sparse @ dense (batch 1: ``W_csr @ x``, matrix-vector);
* ``csr_linear`` - ``F.linear(x, W_csr, b)``, the obvious call, which torch runs
  as dense @ sparse^T;
* ``bsr``        - :class:`symfast.nn.SparseLinear` with ``sparse_format="bsr"``,
  16 x 16 blocks (every block that holds a nonzero is stored whole);
* ``coo``        - ``torch.sparse.mm(W_coo, x^T)^T``.

Run ``OMP_NUM_THREADS=1 pytest benchmarks/test_sparse_inference.py`` (also
with 2 threads); the table of medians and speed-ups over dense is printed at
the end. Timing follows ``bench_utils.run_pedantic``; outputs are checked
against dense before timing.
"""

from __future__ import annotations

from typing import Callable, Dict, Tuple

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from symfast.nn import SparseLinear

from bench_utils import machine_description, run_pedantic

SIZE = 4096
# 90/95/99% are the targets; 70 and 80% locate the crossover below which dense wins.
SPARSITIES = [0.70, 0.80, 0.90, 0.95, 0.99]
BATCHES = [1, 4, 16, 64]
IMPLS = ["dense", "csr", "csr_linear", "bsr", "coo"]

_MEDIANS: Dict[Tuple[float, int, str], float] = {}
_LAYERS: Dict[float, Dict[str, object]] = {}


def _layers(sparsity: float) -> Dict[str, object]:
    """The dense Linear at this sparsity and its sparse forms, built once per sparsity."""
    if sparsity not in _LAYERS:
        _LAYERS.clear()  # one sparsity's layers at a time (the BSR form alone is 64 MiB)
        gen = torch.Generator().manual_seed(0)
        dense = nn.Linear(SIZE, SIZE)
        with torch.no_grad():
            keep = torch.rand(SIZE, SIZE, generator=gen) >= sparsity
            dense.weight.mul_(keep)
        dense.requires_grad_(False)
        _LAYERS[sparsity] = {
            "dense": dense,
            "csr": SparseLinear.from_dense(dense, sparse_format="csr"),
            "csr_weight": dense.weight.to_sparse_csr(),
            "bsr": SparseLinear.from_dense(dense, sparse_format="bsr", blocksize=(16, 16)),
            "coo_weight": dense.weight.to_sparse().coalesce(),
        }
    return _LAYERS[sparsity]


def _forward(impl: str, layers: Dict[str, object], x: torch.Tensor) -> Callable[[], torch.Tensor]:
    dense = layers["dense"]
    if impl == "dense":
        return lambda: dense(x)
    if impl in ("csr", "bsr"):
        return lambda: layers[impl](x)
    if impl == "csr_linear":
        return lambda: F.linear(x, layers["csr_weight"], dense.bias)
    if impl == "coo":
        return lambda: torch.sparse.mm(layers["coo_weight"], x.t()).t() + dense.bias
    raise ValueError(f"unknown impl {impl!r}")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("batch", BATCHES, ids=lambda b: f"batch{b}")
@pytest.mark.parametrize("sparsity", SPARSITIES, ids=lambda s: f"sparsity{s:g}")
def test_sparse_linear_forward(benchmark, sparsity: float, batch: int, impl: str):
    layers = _layers(sparsity)
    x = torch.randn(batch, SIZE, generator=torch.Generator().manual_seed(1))
    fn = _forward(impl, layers, x)
    with torch.no_grad():
        ref = layers["dense"](x)
        # Another summation order: float rounding, relative to the size of the terms.
        torch.testing.assert_close(fn(), ref, rtol=1e-4, atol=1e-4)
    benchmark.group = f"sparse Linear {SIZE}x{SIZE} forward sparsity={sparsity:g} batch={batch} cpu"
    benchmark.extra_info.update(op="linear forward", shape=[SIZE, SIZE], sparsity=sparsity, batch=batch,
                                impl=impl, threads=torch.get_num_threads())
    with torch.no_grad():
        run_pedantic(benchmark, fn, "cpu")
    if benchmark.stats is not None:  # None under --benchmark-disable
        _MEDIANS[(sparsity, batch, impl)] = benchmark.stats.stats.median


@pytest.fixture(scope="module", autouse=True)
def _print_table(request):
    yield
    if not _MEDIANS:
        return
    info = machine_description()
    lines = [f"sparse inference, Linear {SIZE}x{SIZE} float32 forward, median ms (speed-up over dense); "
             f"{info['cpu_model']}, torch {info['torch']}, {torch.get_num_threads()} thread(s)",
             "| sparsity | batch | " + " | ".join(IMPLS) + " |", "|---|---|" + "---|" * len(IMPLS)]
    for sparsity in SPARSITIES:
        for batch in BATCHES:
            if not any((sparsity, batch, impl) in _MEDIANS for impl in IMPLS):
                continue  # deselected
            dense = _MEDIANS.get((sparsity, batch, "dense"))
            cells = []
            for impl in IMPLS:
                t = _MEDIANS.get((sparsity, batch, impl))
                if t is None:
                    cells.append("-")
                elif impl == "dense" or dense is None:
                    cells.append(f"{t * 1e3:.2f}")
                else:
                    cells.append(f"{t * 1e3:.2f} ({dense / t:.2f}x)")
            lines.append(f"| {sparsity:.0%} | {batch} | " + " | ".join(cells) + " |")
    # Printed past pytest's output capture, after the case's own lines.
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():
        print("\n" + "\n".join(lines))
