"""A training monitor that records the collapse metrics of :mod:`symfast.metrics` and plots them.

:class:`CollapseMonitor` reads the parameters and gradients at each step, and each tracked layer's
output of the last forward pass through a forward hook.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .metrics import dead_parameters, dormant_units, effective_rank, homogeneity, rank_metrics, sparsity, unit_rows, vanishing_neurons

__all__ = ["CollapseMonitor"]


def _units_view(out: Any, max_samples: int, channels_first: bool) -> Optional[Tensor]:
    """A layer output as [samples, units]: units are the last dim for linear layers, dim 1 for
    convolution maps ([B, C, ...])."""
    if isinstance(out, (tuple, list)):
        out = out[0] if out else None
    if not isinstance(out, Tensor) or out.dim() < 2 or not out.is_floating_point():
        return None
    x = out.detach()
    if channels_first:
        x = x.movedim(1, -1)
    if x.numel() == 0:
        return None  # no units or no samples: no activation metrics
    return x.reshape(-1, x.shape[-1])[:max_samples]


class CollapseMonitor:
    """Records collapse metrics during training and plots them.

    ::

        monitor = CollapseMonitor(model, every=10)
        for step, (x, y) in enumerate(loader):
            loss = loss_fn(model(x), y)
            loss.backward()
            monitor.step(loss=loss.item())    # after backward, before zero_grad
            opt.step(); opt.zero_grad()
        monitor.plot(path="collapse.png")
        monitor.close()                        # removes the activation hooks

    Per step it records ``sparsity`` (all parameters, ``|theta| < sparsity_tol``) and
    ``dead_fraction`` (entries with ``|grad| <= dead_tol``, when gradients exist), and for each
    tracked layer ``"<layer>/<metric>"``: the four ranks of the weight (:func:`rank_metrics`), the
    fraction of vanishing neurons and of near-identical neurons (rows of the weight), and, from the
    layer's output in the last forward pass (captured by a forward hook), the fraction of dormant
    units, the number of correlated blocks (:func:`homogeneity` on the activations) and the
    effective rank of the features. Extra keyword values given to :meth:`step` (e.g. the loss) are
    recorded as they are.

    Args:
        layers: names of modules to track; default: every module with a weight of >= 2 dims
            (linear and convolution layers, DCS layers).
        every: record every ``every``-th call of :meth:`step`.
        activations: capture layer outputs (forward hooks) for the activation metrics.
        max_samples: rows of each captured output used by the activation metrics.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        layers: Optional[Sequence[str]] = None,
        every: int = 1,
        activations: bool = True,
        sparsity_tol: float = 1e-6,
        vanish_tol: float = 1e-6,
        dead_tol: float = 1e-8,
        dormant_tau: float = 0.025,
        near_identical: float = 0.1,
        corr_threshold: float = 0.9,
        max_samples: int = 1024,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"CollapseMonitor: model must be an nn.Module, got {type(model).__name__}")
        if every < 1:
            raise ValueError(f"CollapseMonitor: every must be >= 1, got {every}")
        self.model = model
        mods = dict(model.named_modules())
        if layers is None:
            layers = [n for n, m in mods.items()
                      if isinstance(getattr(m, "weight", None), Tensor) and m.weight.dim() >= 2 and not isinstance(m, nn.MultiheadAttention)]
        missing = [n for n in layers if n not in mods]
        if missing:
            raise KeyError(f"CollapseMonitor: layers {missing} are not modules of the model (have {list(mods)[:10]})")
        # checked now, not at the first measure(): every tracked layer needs a matrix weight
        for n in layers:
            w = getattr(mods[n], "weight", None)
            if not isinstance(w, Tensor) or w.dim() < 2:
                got = f"a weight of shape {tuple(w.shape)}" if isinstance(w, Tensor) else "no weight tensor"
                raise ValueError(f"CollapseMonitor: layers entry {n!r} ({type(mods[n]).__name__}) must have a weight "
                                 f"of >= 2 dims (linear, convolution or DCS layers), got {got}")
        if not any(p.numel() for p in model.parameters()):
            raise ValueError(f"CollapseMonitor: model ({type(model).__name__}) must have parameters with entries to "
                             f"monitor, got {sum(1 for _ in model.parameters())} parameters and no entries")
        self.layers = list(layers)
        self.every = every
        self.opts = dict(sparsity_tol=sparsity_tol, vanish_tol=vanish_tol, dead_tol=dead_tol, dormant_tau=dormant_tau,
                         near_identical=near_identical, corr_threshold=corr_threshold)
        self.max_samples = max_samples
        self.history: List[Dict[str, float]] = []
        self._calls = 0
        self._acts: Dict[str, Tensor] = {}
        self._handles = []
        if activations:
            for n in self.layers:
                self._handles.append(mods[n].register_forward_hook(self._hook(n)))

    def _hook(self, name: str):
        def hook(module, inp, out):
            v = _units_view(out, self.max_samples, isinstance(module, nn.modules.conv._ConvNd))
            if v is not None:
                self._acts[name] = v
        return hook

    def close(self) -> None:
        """Removes the forward hooks."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self._acts = {}

    def __enter__(self) -> "CollapseMonitor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @torch.no_grad()
    def measure(self) -> Dict[str, float]:
        """The metrics now (without recording them)."""
        o = self.opts
        rec: Dict[str, float] = {"sparsity": sparsity(self.model, tol=o["sparsity_tol"])}
        params = list(self.model.parameters())
        if any(p.grad is not None for p in params):
            rec["dead_fraction"] = dead_parameters(self.model, tol=o["dead_tol"]).fraction
        mods = dict(self.model.named_modules())
        for name in self.layers:
            m = mods[name]
            w = m.weight.detach()
            for k, v in rank_metrics(w).items():
                rec[f"{name}/{k}"] = float(v)
            if w.shape[0] == 0:
                continue  # no neurons: the ranks are 0, the per-neuron fractions undefined
            b = getattr(m, "bias", None)
            b = b if isinstance(b, Tensor) and b.shape == (w.shape[0],) else None
            rec[f"{name}/vanishing_fraction"] = vanishing_neurons(w, bias=b, tol=o["vanish_tol"]).double().mean().item()
            rows = torch.cat([unit_rows(w), b[:, None]], 1) if b is not None else w
            rec[f"{name}/near_identical_fraction"] = homogeneity(rows, near_identical=o["near_identical"]).near_identical_fraction
            a = self._acts.get(name)
            if a is not None and a.shape[0] >= 2:
                rec[f"{name}/dormant_fraction"] = dormant_units(a, tau=o["dormant_tau"]).double().mean().item()
                if a.shape[1] == w.shape[0]:
                    rec[f"{name}/block_count"] = float(homogeneity(rows, activations=a, corr_threshold=o["corr_threshold"]).block_count)
                rec[f"{name}/feature_effective_rank"] = effective_rank(a)
        return rec

    def step(self, step: Optional[int] = None, **extra: float) -> Optional[Dict[str, float]]:
        """Records the metrics on every ``every``-th call; returns the record (None when skipped)."""
        i = self._calls if step is None else int(step)
        self._calls += 1
        if i % self.every:
            return None
        rec = {"step": float(i), **self.measure()}
        for k, v in extra.items():
            rec[k] = float(v.item() if isinstance(v, Tensor) else v)
        self.history.append(rec)
        return rec

    def keys(self) -> List[str]:
        out: Dict[str, None] = {}
        for r in self.history:
            out.update(dict.fromkeys(k for k in r if k != "step"))
        return list(out)

    def series(self, key: str) -> Tuple[List[float], List[float]]:
        """(steps, values) of one metric over the recorded steps where it exists."""
        pts = [(r["step"], r[key]) for r in self.history if key in r]
        if not pts and key not in self.keys():
            raise KeyError(f"CollapseMonitor.series: no metric {key!r}; recorded: {self.keys()}")
        return [p[0] for p in pts], [p[1] for p in pts]

    def plot(self, metrics: Optional[Sequence[str]] = None, *, path: Optional[str] = None, ncols: int = 3):
        """One panel per metric kind (the part after ``/``), one line per layer.

        ``metrics``: metric kinds or full keys to show (default: all). Returns a
        ``matplotlib.figure.Figure`` (made without pyplot, so no global state or display is
        touched); ``path`` saves it too.
        """
        from matplotlib.figure import Figure

        if not self.history:
            raise ValueError("CollapseMonitor.plot: nothing recorded yet; call step() during training")
        keys = self.keys()
        groups: Dict[str, List[str]] = {}
        for k in keys:
            kind = k.split("/")[-1]
            if metrics is None or kind in metrics or k in metrics:
                groups.setdefault(kind, []).append(k)
        if not groups:
            raise ValueError(f"CollapseMonitor.plot: none of {list(metrics or [])} was recorded; recorded: {keys}")
        n = len(groups)
        ncols = min(ncols, n)
        nrows = math.ceil(n / ncols)
        fig = Figure(figsize=(4.2 * ncols, 3.0 * nrows), layout="constrained")
        axes = fig.subplots(nrows, ncols, squeeze=False).reshape(-1)
        for ax, (kind, ks) in zip(axes, groups.items()):
            for k in ks:
                xs, ys = self.series(k)
                ax.plot(xs, ys, label=k.rsplit("/", 1)[0] if "/" in k else k)
            ax.set_title(kind)
            ax.set_xlabel("step")
            if len(ks) > 1 or "/" in ks[0]:
                ax.legend(fontsize=7)
        for ax in axes[n:]:
            ax.set_visible(False)
        if path is not None:
            fig.savefig(path, dpi=120)
        return fig


