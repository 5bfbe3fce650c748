"""The orthonormality check of a mirror's ``O``, shared by :mod:`symfast.nn`, :mod:`symfast.symmetry`
and :mod:`symfast.collapse` (each words its own error, naming its own argument)."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["orthonormality_error"]


def orthonormality_error(columns: Tensor) -> float:
    """``max |O^T O - I|`` for ``O = columns`` (shape ``[D, k]``), computed in float64; nan when
    ``O`` holds a nan, so that ``not err <= tol`` rejects it."""
    O = columns.detach().to(torch.float64)
    eye = torch.eye(O.shape[1], dtype=torch.float64, device=O.device)
    return (O.T @ O - eye).abs().max().item() if O.shape[1] else 0.0
