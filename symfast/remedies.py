r"""The paper's two plasticity remedies (§4.4) as one-line hooks.

A fixed random offset ``w -> w + beta`` (:func:`add_random_bias`) moves every mirror off the origin,
so weight decay no longer pulls towards the symmetric solution; gradient noise
(:func:`add_gradient_noise`) removes the absorbing states.
"""

from __future__ import annotations

from typing import Callable, Dict, Iterable, List, Optional, Union

import torch
from torch import Tensor, nn

__all__ = ["add_random_bias", "add_gradient_noise", "GradientNoise"]


class _FixedOffset(nn.Module):
    """Parametrization ``theta = original + beta`` with a fixed (buffer) beta."""

    def __init__(self, beta: Tensor, keep_function: bool) -> None:
        super().__init__()
        self.register_buffer("beta", beta)
        self.keep_function = keep_function

    def forward(self, original: Tensor) -> Tensor:
        return original + self.beta

    def right_inverse(self, value: Tensor) -> Tensor:
        return value - self.beta if self.keep_function else value


def add_random_bias(
    model: nn.Module,
    *,
    std: float = 1e-2,
    seed: int = 0,
    include: Optional[Callable[[str, Tensor], bool]] = None,
    keep_function: bool = False,
) -> List[str]:
    r"""§4.4 remedy (1): bias every parameter by a fixed random constant, ``w_i -> w_i + beta_i``.

    Registered with ``torch.nn.utils.parametrize``: the trained tensor is the ``original`` and the
    module sees ``original + beta`` (``beta ~ N(0, std^2)``, a buffer, seeded; the paper's App. A.3
    uses std 1e-2). Every mirror through the origin of the trained tensors moves to ``-beta``, so
    weight decay (acting on the originals) no longer pulls the model onto the symmetric solution
    (footnote 9).

    Args:
        include: ``include(name, param)`` selects the parameters (default: all).
        keep_function: False (the paper's recipe, for use at initialization): the module computes
            with ``current + beta``. True: the originals are set to ``current - beta``, so the
            model computes exactly the same function as before the call. Then a model already
            on a stationary condition stays there under plain SGD (the gradient still vanishes);
            weight decay, which pulls the originals to 0 and so the weights to ``beta``, is what
            moves it off.

    Returns the names of the parameters it biased. Note that parametrized parameters appear in
    ``state_dict`` as ``<module>.parametrizations.<name>.original`` (and ``.0.beta``).
    """
    from torch.nn.utils import parametrize

    g = torch.Generator().manual_seed(seed)
    todo = []
    for mname, m in model.named_modules():
        if ".parametrizations." in f".{mname}." or mname.endswith("parametrizations"):
            continue
        for pname, p in list(m._parameters.items()):
            if p is None:
                continue
            full = f"{mname}.{pname}" if mname else pname
            if include is None or include(full, p):
                todo.append((m, pname, full, p))
    for m, pname, full, p in todo:
        beta = (std * torch.randn(p.shape, generator=g, dtype=torch.float64)).to(device=p.device, dtype=p.dtype)
        parametrize.register_parametrization(m, pname, _FixedOffset(beta, keep_function))
    return [t[2] for t in todo]


class GradientNoise:
    """Handle of :func:`add_gradient_noise`; ``remove()`` detaches the hooks."""

    def __init__(self, handles: list) -> None:
        self._handles = handles

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def add_gradient_noise(
    target: Union[nn.Module, torch.optim.Optimizer, Iterable[Tensor]],
    *,
    std: float = 1e-2,
    seed: int = 0,
) -> GradientNoise:
    r"""§4.4 remedy (2): add Gaussian noise ``N(0, std^2)`` to every gradient, removing the
    stationary conditions (absorbing states). The paper's App. A.3 uses variance 1e-4 (std 1e-2).

    ``target``: an optimizer (noise is added once per ``optimizer.step()``, by a step pre-hook, to
    every gradient that exists), or a module / iterable of parameters (noise is added when each
    gradient has been accumulated, by ``register_post_accumulate_grad_hook``: once per backward).
    Each parameter draws from its own generator seeded from ``seed``, so runs are reproducible.
    """
    if std < 0:
        raise ValueError(f"add_gradient_noise: std must be >= 0, got {std}")

    def noise_for(i: int, p: Tensor, gens: Dict[int, torch.Generator]) -> Tensor:
        if i not in gens:
            gens[i] = torch.Generator(device=p.device).manual_seed(seed * 1_000_003 + i)
        return std * torch.randn(p.shape, generator=gens[i], device=p.device, dtype=p.dtype)

    gens: Dict[int, torch.Generator] = {}
    if isinstance(target, torch.optim.Optimizer):
        def pre_hook(opt, args, kwargs):
            i = 0
            for group in opt.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        p.grad.add_(noise_for(i, p, gens))
                    i += 1
        return GradientNoise([target.register_step_pre_hook(pre_hook)])
    params = list(target.parameters()) if isinstance(target, nn.Module) else list(target)
    handles = []
    for i, p in enumerate(params):
        if not isinstance(p, Tensor) or not p.requires_grad:
            raise TypeError(f"add_gradient_noise: target[{i}] must be a tensor that requires grad")

        def hook(param, i=i):
            param.grad.add_(noise_for(i, param, gens))

        handles.append(p.register_post_accumulate_grad_hook(hook))
    return GradientNoise(handles)
