"""symfast.models: the networks that the training tasks and the paper experiments share.

:class:`ByteTransformer` (a decoder-only byte language model), :class:`DigitsCNN` (8x8 digits) and
:class:`ResNet18` (the CIFAR variant). All are plain torch modules that :func:`symfast.convert` converts.
"""

from .cnn import DigitsCNN
from .resnet import ResNet18
from .transformer import ByteTransformer

__all__ = ["ByteTransformer", "DigitsCNN", "ResNet18"]
