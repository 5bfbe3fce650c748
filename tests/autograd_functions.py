"""autograd.Functions that tests put inside models to reach the engine's paths for them: x**3 with a
backward rule, with or without a forward-mode (jvp) rule, with or without ``@once_differentiable``
(torch cannot differentiate such a backward, and a second reverse pass silently skips it)."""

import torch
from torch.autograd.function import once_differentiable


class Cube(torch.autograd.Function):
    """x**3 with a backward rule and no forward-mode (jvp) rule."""

    @staticmethod
    def forward(x):
        return x ** 3

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])
        ctx.save_for_forward(inputs[0])

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 3 * x * x * g


class CubeJvp(Cube):
    """Cube with a forward-mode rule."""

    @staticmethod
    def jvp(ctx, t):
        (x,) = ctx.saved_tensors
        return 3 * x * x * t


class OnceCube(Cube):
    """Cube whose backward is ``@once_differentiable``."""

    backward = staticmethod(once_differentiable(Cube.backward))


class OnceCubeJvp(CubeJvp):
    """CubeJvp whose backward is ``@once_differentiable``."""

    backward = staticmethod(once_differentiable(Cube.backward))
