r"""SparseLinear: an inference-only nn.Linear whose weight is a torch sparse tensor.

:func:`symfast.export` with ``sparse_format=...`` turns the unstructured-sparse
Linear layers of a trained DCS model into this layer, so that the zeros the
lasso made are skipped at inference instead of multiplied. Formats:

* ``"csr"`` (CPU and CUDA): compressed sparse rows, any sparsity pattern.
  ``y^T = W x^T`` runs as sparse @ dense, the product torch's CPU kernels do
  fastest (``F.linear(x, W_csr)`` computes ``x W^T`` as dense @ sparse^T, several
  times slower on CPU at batch > 1, see ``benchmarks/test_sparse_inference.py``).
* ``"bsr"``: block sparse rows, blocks of ``blocksize`` (default 16 x 16;
  square on the CPU, where torch's product is MKL's) that hold at least one
  nonzero are stored whole. An unstructured pattern fills nearly every block,
  and torch's CPU BSR product is slow: it is for weights whose zeros come in
  blocks.
* ``"semi_structured"`` (CUDA only, float16/bfloat16; torch's
  ``to_sparse_semi_structured``): the 2:4 pattern, at most 2 nonzeros in every
  4 consecutive inputs of a row, which the sparse tensor cores run at up to
  twice the dense speed. A weight that is not 2:4 is an error (DCS does not
  make 2:4 by itself: use ``structure="elementwise"`` with a 2:4 ``mask`` on
  the coordinates to prune, or fine-tune a 2:4 pruned export). **Not tested
  here: the project's CI has no GPU.**

The sparse product sums each output in another order than the dense one, so
outputs agree with the dense layer to float rounding, not bit for bit.
"""

from __future__ import annotations

import warnings
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["SparseLinear", "SPARSE_FORMATS"]

SPARSE_FORMATS = ("csr", "bsr", "semi_structured")
_LAYOUTS = {"csr": torch.sparse_csr, "bsr": torch.sparse_bsr}
DEFAULT_BLOCKSIZE = (16, 16)


class SparseLinear(nn.Module):
    r"""y = x W^T + b with W (out_features, in_features) stored sparse; for inference (W is not trained).

    Build it with :meth:`from_dense`. ``weight`` and ``bias`` are buffers (they
    move with ``.to()`` and are saved by ``torch.save``; safetensors cannot hold a
    sparse tensor). :meth:`to_dense` gives the nn.Linear back.
    """

    def __init__(self, weight: Tensor, bias: Optional[Tensor], *, sparse_format: str) -> None:
        super().__init__()
        if sparse_format not in SPARSE_FORMATS:
            raise ValueError(f"SparseLinear: sparse_format must be one of {SPARSE_FORMATS}, got {sparse_format!r}")
        self.sparse_format = sparse_format
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)

    @classmethod
    @torch.no_grad()
    def from_dense(cls, linear: nn.Linear, *, sparse_format: str = "csr",
                   blocksize: Optional[Tuple[int, int]] = None, name: str = "") -> "SparseLinear":
        """The SparseLinear computing ``linear``'s function; ``name`` only labels errors."""
        where = f"SparseLinear.from_dense({name or type(linear).__name__})"
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"{where}: expected an nn.Linear, got {type(linear).__name__}")
        if sparse_format not in SPARSE_FORMATS:
            raise ValueError(f"{where}: sparse_format must be one of {SPARSE_FORMATS}, got {sparse_format!r}")
        if blocksize is not None and sparse_format != "bsr":
            raise ValueError(f"{where}: blocksize applies to sparse_format='bsr' only, got {blocksize!r}")
        w = linear.weight.detach()
        bias = None if linear.bias is None else linear.bias.detach().clone()
        if sparse_format == "semi_structured":
            return cls(_semi_structured(w, where), bias, sparse_format=sparse_format)
        bs = DEFAULT_BLOCKSIZE if blocksize is None else tuple(blocksize)
        if sparse_format == "bsr" and (len(bs) != 2 or not all(isinstance(b, int) and b >= 1 for b in bs)
                                       or w.shape[0] % bs[0] or w.shape[1] % bs[1]):
            raise ValueError(f"{where}: blocksize must be two positive ints dividing the weight's shape "
                             f"{tuple(w.shape)}, got {blocksize!r}")
        if sparse_format == "bsr" and w.device.type == "cpu" and bs[0] != bs[1]:
            raise ValueError(f"{where}: on the CPU a bsr blocksize must be square (torch's CPU product, MKL, "
                             f"takes only square blocks), got {blocksize!r}")
        with warnings.catch_warnings():
            # torch's notice that sparse CSR/BSR support is "in beta", once per process: not actionable
            warnings.filterwarnings("ignore", "Sparse (CSR|BSR|BSC|CSC) tensor support is in beta")
            weight = w.to_sparse_csr() if sparse_format == "csr" else w.to_sparse_bsr(bs)
        return cls(weight, bias, sparse_format=sparse_format)

    def forward(self, input: Tensor) -> Tensor:
        if self.sparse_format == "semi_structured":
            return F.linear(input, self.weight, self.bias)
        x = input.reshape(-1, self.in_features)
        if x.shape[0] == 1 and self.sparse_format == "csr":
            y = torch.mv(self.weight, x[0]).unsqueeze(0)  # one row: the matrix-vector kernel, about 2x faster
        else:
            # sparse @ dense with the batch as columns (see the module docstring for why not F.linear).
            y = torch.mm(self.weight, x.t()).t()
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(input.shape[:-1] + (self.out_features,))

    @torch.no_grad()
    def to_dense(self) -> nn.Linear:
        w = self.weight.to_dense()
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device="meta", dtype=w.dtype)
        linear.weight = nn.Parameter(w)
        if self.bias is not None:
            linear.bias = nn.Parameter(self.bias.clone())
        return linear.train(self.training)

    def __deepcopy__(self, memo) -> "SparseLinear":
        # A sparse tensor has no storage that copy.deepcopy could copy: clone it instead.
        bias = None if self.bias is None else self.bias.clone()
        new = type(self)(self.weight.clone(), bias, sparse_format=self.sparse_format).train(self.training)
        memo[id(self)] = new
        return new

    def nnz(self) -> int:
        """Stored values (for bsr: whole blocks; for 2:4: half the weight)."""
        if self.sparse_format == "semi_structured":
            return self.weight.numel() // 2
        return int(self.weight.values().numel())

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, sparse_format={self.sparse_format}, nnz={self.nnz()}")


def _semi_structured(w: Tensor, where: str) -> Tensor:
    """The 2:4 semi-structured weight (CUDA, float16/bfloat16), after checking the pattern."""
    if w.device.type != "cuda":
        raise ValueError(f"{where}: sparse_format='semi_structured' (2:4) runs on CUDA only, "
                         f"the weight is on {w.device}")
    if w.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"{where}: sparse_format='semi_structured' needs a float16 or bfloat16 weight, "
                         f"got {w.dtype}")
    if w.shape[1] % 4:
        raise ValueError(f"{where}: a 2:4 weight needs in_features divisible by 4, got {w.shape[1]}")
    per_group = (w.reshape(w.shape[0], -1, 4) != 0).sum(dim=-1)
    worst = int(per_group.max()) if per_group.numel() else 0
    if worst > 2:
        bad = int((per_group > 2).sum())
        raise ValueError(f"{where}: the weight is not 2:4 sparse: {bad} groups of 4 consecutive inputs hold "
                         f"more than 2 nonzeros (up to {worst}); prune it to 2:4 before a semi_structured export")
    return torch.sparse.to_sparse_semi_structured(w)
