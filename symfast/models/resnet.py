"""ResNet18 for 32x32 images (CIFAR-10), built from plain ``nn.Conv2d`` / ``nn.BatchNorm2d`` / ``nn.Linear``.

The standard CIFAR variant (He et al. 2016, as in the common ``kuangliu/pytorch-cifar`` code): a 3x3 stem
convolution with stride 1 and no max-pool, four stages of two :class:`BasicBlock` each with widths
``64, 128, 256, 512`` (times ``width``), strides ``1, 2, 2, 2``, a 1x1 convolution + batch norm on the shortcut
where the shape changes, global average pooling and a linear classifier. 11.2M parameters at ``width=1``.

Every layer with parameters is an exact ``nn.Conv2d``, ``nn.BatchNorm2d`` or ``nn.Linear`` (convolutions without
bias, as usual before batch norm), so :func:`symfast.convert` swaps every convolution and linear layer for its DCS
twin; batch norm has no DCS twin and stays as it is (it is reported in ``model.dcs_report.not_converted``).

``hidden`` (default None: the standard network) inserts a fully connected hidden layer of that many neurons
before the classifier: ``Linear(512 w, hidden) -> ReLU -> Linear(hidden, num_classes)``. The paper's Figure 1-right
/ Figure 5 analyses "the penultimate layer neurons of the fully connected layer with dimension 128", i.e.
``hidden=128``. :meth:`ResNet18.penultimate` returns the penultimate neurons before and after their activation.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["BasicBlock", "ResNet18"]


class BasicBlock(nn.Module):
    """``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``; a 1x1 conv + BN shortcut where the shape changes."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(planes))

    def preactivation(self, x: Tensor) -> Tensor:
        """The block's output before its final ReLU."""
        out = F.relu(self.bn1(self.conv1(x)))
        return self.bn2(self.conv2(out)) + self.shortcut(x)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.preactivation(x))


class ResNet18(nn.Module):
    """ResNet18 for ``(B, 3, 32, 32)`` inputs (CIFAR variant); logits ``(B, num_classes)``.

    Args:
        num_classes: output classes (10 for CIFAR-10).
        width: multiplier of the stage widths 64, 128, 256, 512 (each rounded, at least 1); tests use a small one.
        hidden: None (the standard network: pooled features -> Linear) or the size of a fully connected hidden
            layer before the classifier (Figure 5 of the paper: 128).
        in_channels: input channels (3).

    Attributes: ``conv1, bn1, layer1..layer4`` (the feature extractor), ``fc`` (the head: an ``nn.Linear`` when
    ``hidden`` is None, else ``nn.Sequential(Linear, ReLU, Linear)``), ``feature_dim`` (pooled features, 512 *
    width), ``widths``.
    """

    def __init__(self, num_classes: int = 10, *, width: float = 1.0, hidden: Optional[int] = None,
                 in_channels: int = 3) -> None:
        super().__init__()
        if not width > 0:
            raise ValueError(f"ResNet18: width must be > 0, got {width!r}")
        if hidden is not None and int(hidden) < 1:
            raise ValueError(f"ResNet18: hidden must be None or >= 1, got {hidden!r}")
        self.widths = tuple(max(1, int(round(c * width))) for c in (64, 128, 256, 512))
        self.hidden = None if hidden is None else int(hidden)
        w0 = self.widths[0]
        self.conv1 = nn.Conv2d(in_channels, w0, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(w0)
        layers, in_planes = [], w0
        for planes, stride in zip(self.widths, (1, 2, 2, 2)):
            layers.append(nn.Sequential(BasicBlock(in_planes, planes, stride), BasicBlock(planes, planes, 1)))
            in_planes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.feature_dim = in_planes
        if self.hidden is None:
            self.fc = nn.Linear(in_planes, num_classes)
        else:
            self.fc = nn.Sequential(nn.Linear(in_planes, self.hidden), nn.ReLU(), nn.Linear(self.hidden, num_classes))

    def _trunk(self, x: Tensor) -> Tensor:
        """Everything up to the last block's pre-activation (B, 512 w, H/8, W/8)."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        *first, last = list(self.layer4)
        for blk in first:
            out = blk(out)
        return last.preactivation(out)

    def features(self, x: Tensor) -> Tensor:
        """The globally pooled features fed to the head, ``(B, 512 w)``."""
        return F.adaptive_avg_pool2d(F.relu(self._trunk(x)), 1).flatten(1)

    def penultimate(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        """``(pre, post)``: the penultimate neurons before and after their activation, each ``(B, n)``.

        With ``hidden``: the hidden layer of the head, ``pre = Linear(features)`` (``n = hidden``) and ``post =
        relu(pre)``, the input of the classifier. Without: the ``512 w`` channels of the last block, globally
        average pooled before (``pre``) and after (``post`` = :meth:`features`, the classifier's input) the final
        ReLU.
        """
        z = self._trunk(x)
        if self.hidden is None:
            return (F.adaptive_avg_pool2d(z, 1).flatten(1), F.adaptive_avg_pool2d(F.relu(z), 1).flatten(1))
        pre = self.fc[0](F.adaptive_avg_pool2d(F.relu(z), 1).flatten(1))
        return pre, F.relu(pre)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x))
