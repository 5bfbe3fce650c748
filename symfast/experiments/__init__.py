"""Reproductions of the paper's experiments ("Symmetry Leads to Structured Constraint of Learning").

The registry :data:`EXPERIMENTS` lists every experiment of the reproduction plan (issue 5), in
the order of the combined report. Each entry names a module of this package with the entry point::

    run(out_dir, *, quick=True, seed=0, progress=True, config=None) -> dict

which trains, writes one or more PNG figures, ``result.json`` and ``report.md`` into ``out_dir``
and returns the record (see :mod:`.common`: experiment, claim, verdict computed by a stated
criterion, metrics, config, seconds, ...). ``config`` overrides settings (tests use it for
fewer steps); ``quick`` is about a minute on 2 CPU cores, ``quick=False`` follows the paper's
appendix settings.

Experiments that need library parts still being built (``needs``) are listed as not yet
available, with the reason, rather than left out: ``symfast repro --list`` shows the whole plan.
One becomes available by itself once its module and the modules it needs exist.

This package depends on the library, never the other way round: nothing under ``symfast/``
outside this package may import it.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Optional


@dataclass(frozen=True)
class Experiment:
    """One entry of the reproduction plan."""

    name: str  #: command-line name (``symfast repro NAME``) and output sub-folder
    module: str  #: module of this package holding ``run``
    title: str  #: what of the paper it reproduces
    needs: tuple[str, ...] = ()  #: library modules it needs beyond ``symfast.dcs``
    provider: str = ""  #: where those modules are being built
    main_job: bool = False  #: part of ``symfast demo`` (the curated quick set)
    #: expected wall minutes (quick, full) on 2 otherwise idle cores: the CPU time of single-threaded runs measured
    #: on a shared 2-core machine (CPU time is what the run takes when it has a core to itself)
    minutes: tuple[float, float] = (1.0, 1.0)

    @property
    def qualname(self) -> str:
        return f"{__name__}.{self.module}"

    def unavailable_reason(self) -> Optional[str]:
        """None when the experiment can run, else why not (missing library modules or its own module)."""
        missing = [m for m in self.needs if not _exists(m)]
        if missing:
            return f"not yet available: needs {', '.join(missing)}" + (f" ({self.provider})" if self.provider else "")
        if not _exists(self.qualname):
            deps = f"; it builds on {', '.join(self.needs)}" if self.needs else ""
            origin = f" ({self.provider})" if self.provider else ""
            return f"not yet available: {self.qualname.replace('.', '/')}.py is not written yet{deps}{origin}"
        return None

    @property
    def available(self) -> bool:
        return self.unavailable_reason() is None

    def load(self):
        reason = self.unavailable_reason()
        if reason is not None:
            raise ModuleNotFoundError(f"experiment {self.name!r} is {reason}")
        return importlib.import_module(self.qualname)


def _exists(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


EXPERIMENTS: tuple[Experiment, ...] = (
    Experiment("fig1-left", "fig1_left", "Fig. 1-left: sparsity from the rescaling symmetry and SGD noise",
               main_job=True,
               minutes=(0.2, 1.5)),
    Experiment("fig1-mid", "fig1_mid", "Fig. 1-mid: low rank from the rotation symmetry and SGD noise",
               main_job=True,
               minutes=(1.1, 3.6)),
    Experiment("fig1-right", "fig1_right",
               "Fig. 1-right / Fig. 5: homogeneous neuron blocks from the permutation symmetry and weight decay",
               needs=("symfast.symmetry", "symfast.metrics"), provider="issue 4",
               minutes=(0.4, 2.7)),
    Experiment("fig3", "fig3", "Fig. 3: loss of plasticity over 10 tasks and its two remedies", main_job=True,
               minutes=(0.25, 3.0)),
    Experiment("fig4", "fig4", "Fig. 4: stationary conditions of two 2-D landscapes, with SGD paths", main_job=True,
               minutes=(0.1, 0.2)),
    Experiment("eq6", "eq6", "Eq. 6: the Hessian of the DCS two-layer linear net at w = u = 0", main_job=True,
               minutes=(0.1, 0.1)),
    Experiment("theorem4", "theorem4", "Theorem 4, parts 1-4, on random losses with a given O-mirror",
               needs=("symfast.symmetry", "symfast.curvature"), provider="issue 4",
               minutes=(0.3, 1.0)),
    Experiment("lyapunov", "lyapunov", "Eq. 9 / Theorem 5: predicted vs observed collapse learning rate",
               needs=("symfast.curvature", "symfast.collapse"), provider="issue 4",
               minutes=(0.1, 0.5)),
    Experiment("lasso", "lasso", "Sec. 4.5: L1 equivalence, the DCS path against scikit-learn's Lasso path",
               main_job=True,
               minutes=(0.3, 1.0)),
    Experiment("dcs-cnn", "dcs_cnn", "Fig. 6 / A.4 at CPU scale: DCS on every parameter of a small CNN",
               needs=("symfast.nn", "symfast.convert"), provider="issue 3",
               minutes=(2.0, 7.5)),
    Experiment("mf-weight-decay", "mf_weight_decay",
               "Sec. 4.3 / 4.7: matrix factorization with weight decay converges to low rank",
               minutes=(0.1, 1.2)),
    Experiment("theorems123", "theorems123",
               "Theorems 1-3: rescaling, rotation, permutation: stationary conditions favoured by weight decay",
               minutes=(0.9, 3.5)),
)

#: ``symfast demo``: the curated quick set of the main job.
MAIN_JOB: tuple[str, ...] = tuple(e.name for e in EXPERIMENTS if e.main_job)


def names() -> list[str]:
    return [e.name for e in EXPERIMENTS]


def get(name: str) -> Experiment:
    for e in EXPERIMENTS:
        if e.name == name:
            return e
    raise KeyError(f"unknown experiment {name!r}; known: {', '.join(names())}")


def available() -> list[Experiment]:
    return [e for e in EXPERIMENTS if e.available]


def run(name: str, out_root: str | Path, *, quick: bool = True, seed: int = 0, progress: bool = True,
        config: Optional[dict] = None) -> dict:
    """Run one experiment into ``out_root/name``; returns its record."""
    exp = get(name)
    module = exp.load()
    return module.run(Path(out_root) / exp.name, quick=quick, seed=seed, progress=progress, config=config)


__all__ = ["Experiment", "EXPERIMENTS", "MAIN_JOB", "names", "get", "available", "run"]
