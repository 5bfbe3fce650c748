"""A small CNN for 8x8 digits (scikit-learn's digits), used by ``symfast train --task digits`` and
``symfast repro dcs-cnn``. Plain ``nn.Conv2d`` / ``nn.Linear`` layers in one ``nn.Sequential``, so that
:func:`symfast.convert` swaps each of them and :func:`symfast.export` can remove dead units.
"""

from __future__ import annotations

from torch import nn

__all__ = ["DigitsCNN"]


class DigitsCNN(nn.Sequential):
    """Conv(1->c) ReLU Conv(c->2c) ReLU MaxPool Flatten Linear ReLU Linear(10), for ``(B, 1, 8, 8)`` inputs."""

    def __init__(self, *, channels: int = 32, hidden: int = 128) -> None:
        super().__init__(
            nn.Conv2d(1, channels, 3, padding=1), nn.ReLU(),
            nn.Conv2d(channels, 2 * channels, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2), nn.Flatten(),
            nn.Linear(2 * channels * 16, hidden), nn.ReLU(),
            nn.Linear(hidden, 10),
        )
