r"""``symfast train --target-sparsity S``: a controller that adapts the DCS penalty ``alpha`` during training.

Why a controller and not a fixed alpha: the sparsity a given alpha reaches depends on the learning
rate, the budget and the model (on the lm task alpha 3e-4 gives 57% at Adam lr 3e-3 and 96% at 2e-2),
so a fixed default means little. Why not probe runs: each probe costs a training run, and the
sparsity of a short probe is not that of the full budget.

The goal is gradual magnitude pruning's cubic ramp (Zhu & Gupta 2017, with the schedule of
:func:`~symfast.train.baselines.gmp_schedule`: flat for the first 10% of the phase, the target from
60% on), continuous between GMP's pruning events, so DCS and GMP sparsify on the same timetable.
Like Zhu & Gupta's initial sparsity ``s_i``, the ramp starts from the sparsity measured at 10%:
small initial weights are below the export threshold from the start (about 40% on digits), and a
ramp from 0 would read them as overshoot. Every ``every`` steps (1% of the phase) alpha is
multiplied by ``exp(gain * (goal - predicted))``, clamped to ``[1/max_down, max_up]`` and to
``[start, cap]`` times the reference alpha (the run's ``--alpha``). Why each part:

* **Zeros are sticky** (``w = u = 0`` is a fixed point of the gradient): sparsity reached is not
  undone, so the controller must approach the goal from below. It starts from an alpha too small
  to sparsify much (``start`` = 1% of the reference), holds it through the flat 10%, and then
  grows it geometrically (up to ``max_up`` = 1.5 per check: 100x in about 11% of the steps) only
  while the sparsity is behind the ramp; when it is ahead, alpha falls faster (``max_down`` = 4).
  Starting at the reference instead overshot: on digits alpha 3e-4 is at 0.76 by 10% of the run.
* **Sparsity lags alpha** by about a tenth of the run: the controller compares the goal
  ``horizon`` (10%) steps ahead with the sparsity extrapolated there from its last increase.
* **The lr decays** (cosine): the same alpha moves the weights less late in the run, which is
  why the controller acts from the start of the ramp, when the lr is high, rather than catching
  up later. Dividing alpha by the lr's schedule was tried and not kept: it drove alpha to the cap
  in the last tenth of the run, which cost loss and moved the sparsity by less than 0.01.
* **The cap** (10x the reference): past it the penalty swamps the loss (on digits alpha 3e-3
  zeroes nearly every weight); a target out of reach at the cap is missed, not forced.

With Adam, any alpha > 0 zeroes the weights whose loss gradient is zero (Adam divides the decay
by its own size), so a target below that free sparsity is missed from above (on digits at lr 1e-2,
about 0.6).

alpha lives in the optimizer's coupled weight decay (``2 alpha`` on the penalized factors, see
:func:`symfast.param_groups`), and the controller's state (the reference alpha, the ramp's start
and the last measurement) in the first penalized group, which the optimizer's state dict holds,
so a resumed run continues where it was.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..nn.layers import DCSLayer
from .baselines import gmp_schedule
from .loop import dcs_sparsity

__all__ = ["SparsityTarget"]


class SparsityTarget:
    """``fit(after_step=...)`` hook steering the thresholded sparsity of ``model``'s DCS layers to ``target``.

    ``opt`` must be the optimizer that ``fit`` steps (built with :func:`symfast.param_groups`); its
    groups holding penalized factors have their ``weight_decay`` (``2 alpha``) set by the controller.
    The reference alpha is the one those groups hold when the controller is built; the controller
    starts at ``start`` times it and never exceeds ``cap`` times it.
    """

    def __init__(self, model: nn.Module, opt: torch.optim.Optimizer, *, target: float, steps: int,
                 threshold: float, every: int | None = None, gain: float = 4.0, max_up: float = 1.5,
                 max_down: float = 4.0, start: float = 1e-2, cap: float = 10.0) -> None:
        if not 0.0 < target < 1.0:
            raise ValueError(f"SparsityTarget: target must be in (0, 1), got {target}")
        if not (steps >= 1 and 0 < start <= 1 <= cap and max_up > 1 and max_down > 1 and gain > 0):
            raise ValueError("SparsityTarget: expected steps >= 1, 0 < start <= 1 <= cap, max_up > 1, max_down > 1, "
                             f"gain > 0; got steps={steps}, start={start}, cap={cap}, max_up={max_up}, "
                             f"max_down={max_down}, gain={gain}")
        penalized = {id(p) for m in model.modules() if isinstance(m, DCSLayer)
                     for p in m.parametrization.penalized_parameters()}
        self.opt = opt
        # Indices, not the group dicts: Optimizer.load_state_dict (a resume) replaces the dicts.
        self.indices = [i for i, g in enumerate(opt.param_groups) if any(id(p) in penalized for p in g["params"])]
        decays = [opt.param_groups[i]["weight_decay"] for i in self.indices]
        if not decays or any(d <= 0 for d in decays) or len(set(decays)) > 1:
            raise ValueError("SparsityTarget: the model needs DCS layers with one alpha > 0 (the controller scales "
                             f"it), got weight decays {decays} (2 alpha) on the penalized groups")
        self.model, self.target, self.threshold = model, target, threshold
        self.schedule = gmp_schedule(steps)
        self.every = every or max(1, steps // 100)
        self.gain, self.max_up, self.max_down, self.start, self.cap = gain, max_up, max_down, start, cap
        self.steps, self.horizon = steps, max(1, steps // 10)
        self.reference = decays[0] / 2
        self._set(start * self.reference)
        self.groups[0]["alpha_reference"] = self.reference  # fit's resume replaces the groups with the saved ones

    @property
    def groups(self):
        return [self.opt.param_groups[i] for i in self.indices]

    @property
    def alpha(self) -> float:
        """The alpha the penalized groups hold now."""
        return self.groups[0]["weight_decay"] / 2

    def _set(self, alpha: float) -> None:
        for g in self.groups:
            g["weight_decay"] = 2 * alpha

    def goal(self, step: int) -> float:
        """The cubic ramp from the initial sparsity (measured at the ramp's start) to ``target``."""
        s = self.schedule
        t = min(1.0, max(0.0, (step - s["start"]) / (s["events"] * s["every"])))
        initial = min(self.target, self.groups[0].get("initial_sparsity", 0.0))
        return self.target + (initial - self.target) * (1.0 - t) ** 3

    def __call__(self, step: int) -> None:
        if step % self.every:
            return
        g0 = self.groups[0]
        reference = g0["alpha_reference"]
        previous = g0.get("measured_sparsity")
        measured = dcs_sparsity(self.model, threshold=self.threshold)
        g0["measured_sparsity"] = measured
        if step <= self.schedule["start"]:
            g0["initial_sparsity"] = measured  # the ramp starts where the sparsity is when the flat part ends
            return
        ahead = min(self.horizon, self.steps - step)
        slope = 0.0 if previous is None else max(0.0, measured - previous) / self.every
        predicted = measured + slope * ahead
        change = min(self.max_up, max(1.0 / self.max_down, math.exp(self.gain * (self.goal(step + ahead) - predicted))))
        self._set(min(self.cap * reference, max(self.start * reference, self.alpha * change)))
