"""Reproductions of the paper's experiments ("Symmetry Leads to Structured Constraint of Learning").

The registry :data:`EXPERIMENTS` lists every experiment, in the order of the combined report.
Each entry names a module of this package with the entry point::

    run(out_dir, *, quick=True, seed=0, progress=True, config=None) -> dict

which trains, writes one or more PNG figures, ``result.json`` and ``report.md`` into ``out_dir``
and returns the record (see :mod:`.common`: experiment, claim, verdict computed by a stated
criterion, metrics, config, seconds, ...). ``config`` overrides settings (tests use it for
fewer steps); ``quick`` is about a minute on 2 CPU cores, ``quick=False`` follows the paper's
appendix settings.

This package depends on the library, never the other way round: nothing under ``symfast/``
outside this package may import it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional


@dataclass(frozen=True)
class Experiment:
    """One experiment of the registry."""

    name: str  #: command-line name (``symfast repro NAME``) and output sub-folder
    module: str  #: module of this package holding ``run``
    title: str  #: what of the paper it reproduces
    main_job: bool = False  #: part of ``symfast demo`` (the curated quick set)
    #: expected wall minutes (quick, full) on 2 otherwise idle cores: full from one timed ``repro --all --full``
    #: on an idle 2-core machine; quick from the CPU time of single-threaded runs on a shared one (CPU time is what
    #: the run takes when it has a core to itself)
    minutes: tuple[float, float] = (1.0, 1.0)

    @property
    def qualname(self) -> str:
        return f"{__name__}.{self.module}"

    def load(self):
        """The experiment's module (it holds ``run``)."""
        return importlib.import_module(self.qualname)


EXPERIMENTS: tuple[Experiment, ...] = (
    Experiment("fig1-left", "fig1_left", "Fig. 1-left: sparsity from the rescaling symmetry and SGD noise",
               main_job=True,
               minutes=(0.2, 0.3)),
    Experiment("fig1-mid", "fig1_mid", "Fig. 1-mid: low rank from the rotation symmetry and SGD noise",
               main_job=True,
               minutes=(1.1, 3.1)),
    Experiment("fig1-right", "fig1_right",
               "Fig. 1-right / Fig. 5: homogeneous neuron blocks from the permutation symmetry and weight decay",
               minutes=(0.4, 1.8)),
    Experiment("fig3", "fig3", "Fig. 3: loss of plasticity over 10 tasks and its two remedies", main_job=True,
               minutes=(0.25, 2.4)),
    Experiment("fig4", "fig4", "Fig. 4: stationary conditions of two 2-D landscapes, with SGD paths", main_job=True,
               minutes=(0.1, 0.2)),
    Experiment("eq6", "eq6", "Eq. 6: the Hessian of the DCS two-layer linear net at w = u = 0", main_job=True,
               minutes=(0.1, 0.1)),
    Experiment("theorem4", "theorem4", "Theorem 4, parts 1-4, on random losses with a given O-mirror",
               minutes=(0.3, 2.8)),
    Experiment("lyapunov", "lyapunov", "Eq. 9 / Theorem 5: predicted vs observed collapse learning rate",
               minutes=(0.1, 3.6)),
    Experiment("lasso", "lasso", "Sec. 4.5: L1 equivalence, the DCS path against scikit-learn's Lasso path",
               main_job=True,
               minutes=(0.3, 0.6)),
    Experiment("dcs-cnn", "dcs_cnn", "Fig. 6 / A.4 at CPU scale: DCS on every parameter of a small CNN",
               minutes=(2.0, 6.7)),
    Experiment("mf-weight-decay", "mf_weight_decay",
               "Sec. 4.3 / 4.7: matrix factorization with weight decay converges to low rank",
               minutes=(0.1, 1.0)),
    Experiment("theorems123", "theorems123",
               "Theorems 1-3: rescaling, rotation, permutation: stationary conditions favoured by weight decay",
               minutes=(0.9, 3.1)),
    Experiment("fisher", "fisher", "Sec. 4.3: the Fisher information is singular at symmetric solutions, along O",
               minutes=(0.1, 0.1)),
    Experiment("adam-collapse", "adam_collapse",
               "Sec. 4.3: Adam, like SGD, collapses onto the rescaling symmetry's symmetric solutions",
               minutes=(0.8, 2.4)),
    Experiment("general-p", "general_p",
               "Sec. 4.6: DCS with a general P (group, low rank, random mirror) equals the convex penalty",
               minutes=(0.25, 0.6)),
    Experiment("fig2", "fig2", "Fig. 2-left / Sec. 4.2: the Hessian splits into blocks on im O and ker O^T near a "
               "symmetric solution", minutes=(0.2, 0.3)),
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


def run(name: str, out_root: str | Path, *, quick: bool = True, seed: int = 0, progress: bool = True,
        config: Optional[dict] = None) -> dict:
    """Run one experiment into ``out_root/name``; returns its record."""
    exp = get(name)
    module = exp.load()
    return module.run(Path(out_root) / exp.name, quick=quick, seed=seed, progress=progress, config=config)


__all__ = ["Experiment", "EXPERIMENTS", "MAIN_JOB", "names", "get", "run"]
