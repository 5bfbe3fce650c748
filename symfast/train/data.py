"""Data that ships with every install: bytes of the Python standard library, and scikit-learn's digits.

Both are map-style :class:`torch.utils.data.Dataset` objects, so :func:`symfast.train.fit` can draw
each step's batch from a seeded generator (``indices = randint(len(ds), (batch,), seed + step)``):
the batch of step ``k`` depends only on the seed and ``k``, which is what makes ``--resume`` and
data-parallel training reproduce a single uninterrupted run exactly.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path
from typing import List, Optional, Tuple

import torch
from torch import Tensor
from torch.utils.data import Dataset

__all__ = ["ByteWindows", "stdlib_files", "lm_data", "digits_data"]


class ByteWindows(Dataset):
    """Windows of ``context + 1`` bytes of one long byte string: item ``i`` is ``(x, y) = (b[i:i+T], b[i+1:i+T+1])``."""

    def __init__(self, data: Tensor, context: int) -> None:
        if data.dim() != 1 or data.dtype != torch.uint8:
            raise ValueError(f"ByteWindows: data must be a 1-d uint8 tensor, got {tuple(data.shape)} {data.dtype}")
        if data.numel() <= context + 1:
            raise ValueError(f"ByteWindows: {data.numel()} bytes are too few for context {context}")
        self.data, self.context = data, int(context)

    def __len__(self) -> int:
        return self.data.numel() - self.context - 1

    def __getitem__(self, i: int) -> Tuple[Tensor, Tensor]:
        chunk = self.data[i: i + self.context + 1].long()
        return chunk[:-1], chunk[1:]


def stdlib_files(root: Optional[str] = None) -> List[Path]:
    """The standard library's own ``*.py`` files (top level and packages, not tests or site-packages), sorted."""
    base = Path(root or sysconfig.get_paths()["stdlib"])
    files = []
    for p in sorted(base.rglob("*.py")):
        rel = p.relative_to(base).parts
        if any(part in ("site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__") for part in rel):
            continue
        files.append(p)
    if not files:
        raise FileNotFoundError(f"symfast.train: no Python source files under {base}")
    return files


def lm_data(*, context: int = 64, max_bytes: int = 2_000_000, val_every: int = 10,
            root: Optional[str] = None) -> Tuple[ByteWindows, ByteWindows, dict]:
    """Train and validation byte windows from the standard library, split **by file**.

    Files are taken in sorted order; every ``val_every``-th file goes to validation, the rest to
    training, until ``max_bytes`` bytes are read (so a model never sees validation files). Each file
    ends with a 0 byte as separator. Returns ``(train, val, info)``.
    """
    train: List[bytes] = []
    val: List[bytes] = []
    total = 0
    files = stdlib_files(root)
    for i, path in enumerate(files):
        try:
            b = path.read_bytes() + b"\0"
        except OSError:
            continue
        (val if i % val_every == val_every - 1 else train).append(b)
        total += len(b)
        if total >= max_bytes:
            break
    if not val:
        raise ValueError("symfast.train.lm_data: too few files for a validation split")
    tr = torch.frombuffer(bytearray(b"".join(train)), dtype=torch.uint8)
    va = torch.frombuffer(bytearray(b"".join(val)), dtype=torch.uint8)
    info = {"train_files": len(train), "val_files": len(val), "train_bytes": tr.numel(), "val_bytes": va.numel(),
            "source": str(Path(files[0]).parent)}
    return ByteWindows(tr, context), ByteWindows(va, context), info


def digits_data(*, val_fraction: float = 0.2, seed: int = 0):
    """scikit-learn's bundled 8x8 digits (1797 images, no download) as ``(1, 8, 8)`` float tensors in [0, 1].

    A seeded permutation puts ``val_fraction`` of the images in validation. Returns ``(train, val, info)``.
    """
    from sklearn.datasets import load_digits
    from torch.utils.data import TensorDataset

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_val = int(round(val_fraction * len(y)))
    va, tr = perm[:n_val], perm[n_val:]
    info = {"train_images": len(tr), "val_images": len(va)}
    return TensorDataset(x[tr], y[tr]), TensorDataset(x[va], y[va]), info
