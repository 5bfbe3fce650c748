"""Checkpoints of a ``symfast train`` run: what it writes, and whether ``--resume`` may reuse it.

``DIR/checkpoints/config.json`` records the run's settings when it starts; each phase checkpoint
records them too (:func:`phase_meta`), so that a resumed run reuses only checkpoints of the same
settings (:func:`check_resume_config`, :func:`phase_mismatch`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional

import torch

if TYPE_CHECKING:
    from .task import TrainConfig

__all__ = ["check_resume_config", "RESUME_MAY_DIFFER", "ResumeMismatch", "phase_files", "OUTPUT_FILES"]

#: What a run writes: the phase checkpoints ``DIR/checkpoints/*.pt`` (one per arm, phase and, with a
#: learning-rate grid, lr; see :func:`phase_files`), ``config.json``, and the outputs in ``DIR``.
OUTPUT_FILES = ("metrics.json", "training.png", "exported.pt", "svd_truncation.pt")
#: Settings that may differ between a run and its ``--resume``: the validation frequency (it also sets
#: how often checkpoints are written) changes which steps the history validates, not the trained
#: weights or the final metrics. Everything else in :class:`TrainConfig` must match.
RESUME_MAY_DIFFER = ("eval_every",)


class ResumeMismatch(ValueError):
    """``resume`` with settings other than those the run in the directory started with."""


def config_dict(cfg: "TrainConfig") -> Dict[str, Any]:
    return {k: getattr(cfg, k) for k in cfg.__dataclass_fields__}


def _differ(saved: Dict[str, Any], now: Dict[str, Any]) -> List[str]:
    return [k for k in now if k not in RESUME_MAY_DIFFER and saved.get(k) != now[k]]


def check_resume_config(cfg: "TrainConfig", checkpoints: str | os.PathLike) -> None:
    """:class:`ResumeMismatch` (a ``ValueError``) naming every setting of the resolved ``cfg`` that differs from
    ``checkpoints/config.json``.

    The settings in :data:`RESUME_MAY_DIFFER` may differ; without a ``config.json`` there is nothing to check.
    """
    path = Path(checkpoints) / "config.json"
    if not path.exists():
        return
    saved, now = json.loads(path.read_text()), config_dict(cfg)
    differ = _differ(saved, now)
    if differ:
        raise ResumeMismatch(
            f"symfast train --resume: the run in {path.parent.parent} was started with other settings ("
            + "; ".join(f"{k}: checkpoint {saved.get(k)!r}, now {now[k]!r}" for k in differ)
            + f"). Resume with the same flags (only {', '.join(RESUME_MAY_DIFFER)} may differ), or use another --out."
        )


def phase_meta(cfg: "TrainConfig", phase: str) -> Dict[str, Any]:
    """What each phase checkpoint records (``fit(meta=...)``), so that ``resume`` reuses only this run's."""
    return {"phase": phase, "train_config": config_dict(cfg)}


def phase_mismatch(path: Path, cfg: "TrainConfig") -> Optional[str]:
    """Why the phase checkpoint ``path`` is not this run's; ``None`` when it is (or when there is none)."""
    if not path.exists():
        return None
    meta = torch.load(path, map_location="cpu", weights_only=False, mmap=True).get("meta")
    if not isinstance(meta, dict) or "train_config" not in meta:
        return "it records no run settings (an older symfast wrote it)"
    if meta.get("phase") != path.name:
        return f"it is the checkpoint of another phase ({meta.get('phase')})"
    saved, now = meta["train_config"], config_dict(cfg)
    differ = _differ(saved, now)
    if differ:
        return "it was written by a run with other settings (" + "; ".join(
            f"{k}: {saved.get(k)!r} there, {now[k]!r} now" for k in differ) + ")"
    return None


def phase_files(checkpoints: Path) -> List[Path]:
    """The phase checkpoints in ``checkpoints``."""
    return sorted(checkpoints.glob("*.pt")) if checkpoints.is_dir() else []


def remove_earlier_run(out: Path) -> List[str]:
    """Removes what an earlier run wrote into ``out`` (checkpoints and outputs); returns the paths removed."""
    ck = out / "checkpoints"
    paths = [ck / "config.json", *phase_files(ck)] + (sorted(ck.glob("*.tmp")) if ck.is_dir() else [])
    paths += [out / n for n in OUTPUT_FILES]
    removed = []
    for p in paths:
        if p.is_file():
            p.unlink()
            removed.append(str(p.relative_to(out)))
    return removed


def write_config(cfg: "TrainConfig", checkpoints: Path) -> None:
    checkpoints.mkdir(parents=True, exist_ok=True)
    tmp = checkpoints / "config.json.tmp"
    tmp.write_text(json.dumps(config_dict(cfg), indent=1))
    os.replace(tmp, checkpoints / "config.json")  # atomic: another rank may be reading it
