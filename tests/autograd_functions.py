"""autograd.Functions that tests put inside models to reach the engine's paths for them."""

import torch
from torch.autograd.function import once_differentiable


class OnceCube(torch.autograd.Function):
    """x**3 whose backward is ``@once_differentiable``: torch cannot differentiate that backward,
    and a second reverse pass silently skips it (its result is cut off from the graph)."""

    @staticmethod
    def forward(x):
        return x ** 3

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        x, = ctx.saved_tensors
        return 3 * x * x * g
