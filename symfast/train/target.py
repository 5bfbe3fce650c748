r"""``symfast train --target-sparsity S``: a controller that adapts the DCS penalty ``alpha`` during training.

Why a controller and not a fixed alpha: the sparsity a given alpha reaches depends on the learning
rate, the budget and the model (on the lm task alpha 3e-4 gives 57% at Adam lr 3e-3 and 96% at 2e-2),
so a fixed default means little. Why not probe runs: each probe costs a training run, and the
sparsity of a short probe is not that of the full budget. The controller follows the same cubic
ramp as gradual magnitude pruning (:func:`~symfast.train.baselines.gmp_sparsity`: 0 until 10% of
the phase, the target from 60% on) and, every ``every`` steps, multiplies alpha by
``exp(gain * (goal - measured))``, clamped to ``[1/max_down, max_up]``, where ``measured`` is the
zero fraction after the export threshold. The clamp is asymmetric because DCS's zeros are sticky
(``w = u = 0`` is a fixed point of the gradient): sparsity reached cannot be undone, so alpha rises
slowly and falls fast once the sparsity passes the goal. For the same reason the controller
looks ahead: sparsity lags alpha by about a tenth of the run, so it compares the goal 10% of the
steps ahead with the sparsity extrapolated there from its last increase. The ramp is also the alpha warm-up: the penalty
grows only as the model is asked to become sparser.

alpha lives in the optimizer's coupled weight decay (``2 alpha`` on the penalized factors, see
:func:`symfast.param_groups`), which the optimizer's state dict holds, so a resumed run continues
with the alpha it had reached.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..nn.layers import DCSLayer
from .baselines import gmp_schedule, gmp_sparsity
from .loop import dcs_sparsity

__all__ = ["SparsityTarget"]


class SparsityTarget:
    """``fit(after_step=...)`` hook steering the thresholded sparsity of ``model``'s DCS layers to ``target``.

    ``opt`` must be the optimizer that ``fit`` steps (built with :func:`symfast.param_groups`); its
    groups holding penalized factors have their ``weight_decay`` (``2 alpha``) scaled.
    """

    def __init__(self, model: nn.Module, opt: torch.optim.Optimizer, *, target: float, steps: int,
                 threshold: float, every: int | None = None, gain: float = 4.0, max_up: float = 1.15,
                 max_down: float = 4.0) -> None:
        if not 0.0 < target < 1.0:
            raise ValueError(f"SparsityTarget: target must be in (0, 1), got {target}")
        penalized = {id(p) for m in model.modules() if isinstance(m, DCSLayer)
                     for p in m.parametrization.penalized_parameters()}
        self.groups = [g for g in opt.param_groups if any(id(p) in penalized for p in g["params"])]
        if not self.groups or all(g["weight_decay"] == 0 for g in self.groups):
            raise ValueError("SparsityTarget: the model needs DCS layers with alpha > 0 (a multiplicative "
                             "controller cannot move alpha away from 0)")
        self.model, self.target, self.threshold = model, target, threshold
        self.schedule = gmp_schedule(steps)
        self.every = every or max(1, steps // 100)
        self.gain, self.max_up, self.max_down = gain, max_up, max_down
        self.steps, self.horizon = steps, max(1, steps // 10)

    @property
    def alpha(self) -> float:
        """The alpha of the first penalized group (all groups are scaled alike)."""
        return self.groups[0]["weight_decay"] / 2

    def goal(self, step: int) -> float:
        return gmp_sparsity(step, final=self.target, **self.schedule)

    def __call__(self, step: int) -> None:
        if step % self.every or step <= self.schedule["start"]:
            return  # before the ramp the goal is 0, and the untrained weights below the threshold are no signal
        measured = dcs_sparsity(self.model, threshold=self.threshold)
        g0 = self.groups[0]
        previous = g0.get("measured_sparsity")  # kept in the optimizer's state dict, so a resume has it too
        g0["measured_sparsity"] = measured
        ahead = min(self.horizon, self.steps - step)
        slope = 0.0 if previous is None else max(0.0, measured - previous) / self.every
        predicted = measured + slope * ahead
        factor = math.exp(self.gain * (self.goal(step + ahead) - predicted))
        factor = min(self.max_up, max(1.0 / self.max_down, factor))
        for g in self.groups:
            g["weight_decay"] *= factor
