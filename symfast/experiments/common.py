"""Shared plumbing for the reproductions: the result record, criteria, figures and report.md.

Every experiment produces one record (also written as ``DIR/NAME/result.json``)::

    experiment   the registry name, e.g. "fig1-mid"
    title        one line: which figure / equation of the paper
    claim        the paper's claim, in its words (briefly)
    claim_short  the claim in one line, for summary tables
    criterion    the stated criterion, as text, generated from the list of :class:`Criterion`
    verdict      "reproduced" iff every criterion that is not a control holds, else "not reproduced"
    checks       one entry per criterion: the measured value, the threshold, passed or not, control or not
    deviations   one entry per setting where this run differs from the paper's: what, paper, here, reason
    headline     one line of the numbers that decide the verdict (for summary tables)
    metrics      everything measured (the checks read their values from here)
    config       every setting of the run, seed included
    seconds      wall time of the run, figures included
    figures      PNG file names, relative to the experiment's folder
    notes        caveats a reader needs (what the paper does not say, what did not reproduce and why)

The verdict is never written by hand: :func:`make_record` evaluates each :class:`Criterion` on a
value looked up in ``metrics`` by its dotted path, so the verdict can be recomputed from
``result.json`` alone (``tests/test_repro.py`` does so).

A *control* criterion checks the measurement itself (a model without the symmetry, a case the method
cannot get wrong): it is reported, but it never counts toward "reproduced", because a check that
cannot fail on the claim is no evidence for it.
"""

from __future__ import annotations

import contextlib
import json
import math
import operator
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import torch

REPRODUCED = "reproduced"
NOT_REPRODUCED = "not reproduced"
RESULT_FILE = "result.json"
REPORT_FILE = "report.md"

_OPS: dict[str, Callable[[Any, Any], bool]] = {
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
    "==": operator.eq,
}


# ------------------------------------------------------------------ criteria
@dataclass(frozen=True)
class Criterion:
    """One condition of an experiment's criterion: ``metrics[key] <op> threshold``.

    ``key`` is a dotted path into the metrics dict (``"summary.vanilla_max_dead_frac"``);
    ``text`` says in words what the condition means for the claim. ``control``: the check is about the
    measurement, not the claim; it is reported but does not decide the verdict.
    """

    key: str
    op: str
    threshold: Any
    text: str
    control: bool = False

    def __post_init__(self) -> None:
        if self.op not in _OPS:
            raise ValueError(f"Criterion.op must be one of {sorted(_OPS)}, got {self.op!r}")

    def describe(self) -> str:
        tag = "control, not counted: " if self.control else ""
        return f"{tag}{self.text} [{self.key} {self.op} {fmt_value(self.threshold)}]"


def deviation(what: str, paper: Any, here: Any, reason: str) -> dict:
    """One entry of a record's ``deviations``: a setting where this run differs from the paper's."""
    for name, v in (("what", what), ("reason", reason)):
        if not isinstance(v, str) or not v:
            raise ValueError(f"deviation: {name} must be a non-empty string, got {v!r}")
    return {"what": what, "paper": paper, "here": here, "reason": reason}


def apply_overrides(cfg: dict, overrides: dict) -> dict:
    """Sets ``cfg[k] = v`` for each override; a key the config does not have is a TypeError."""
    for k, v in overrides.items():
        if k not in cfg:
            raise TypeError(f"unknown config override {k!r}")
        cfg[k] = v
    return cfg


def lookup(metrics: dict, key: str) -> Any:
    """``metrics`` at a dotted path; KeyError names the missing part."""
    node: Any = metrics
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(f"metrics has no {key!r} (missing {part!r})")
        node = node[part]
    return node


def evaluate(metrics: dict, criterion: Criterion) -> dict:
    """The check of one criterion; a missing or non-finite measurement fails (never passes)."""
    value = lookup(metrics, criterion.key)
    ok = value is not None and not (isinstance(value, float) and not math.isfinite(value))
    passed = bool(ok and _OPS[criterion.op](value, criterion.threshold))
    return {
        "key": criterion.key,
        "op": criterion.op,
        "threshold": criterion.threshold,
        "measured": value,
        "passed": passed,
        "text": criterion.text,
        "control": criterion.control,
    }


def judge(metrics: dict, criteria: Sequence[Criterion]) -> tuple[str, list[dict]]:
    """(verdict, checks): "reproduced" iff every criterion that is not a control holds on ``metrics``."""
    if not any(not c.control for c in criteria):
        raise ValueError("an experiment needs at least one criterion that is not a control")
    checks = [evaluate(metrics, c) for c in criteria]
    counted = [c for c in checks if not c["control"]]
    return (REPRODUCED if all(c["passed"] for c in counted) else NOT_REPRODUCED), checks


def criterion_text(criteria: Sequence[Criterion]) -> str:
    letters = "abcdefghijklmnopqrstuvwxyz"
    parts = [f"({letters[i]}) {c.describe()}" for i, c in enumerate(criteria)]
    return "reproduced iff all of: " + "; ".join(parts) + "."


# ------------------------------------------------------------------- threads
#: The small-tensor loops of these experiments run fastest on one thread, and one thread makes every
#: reduction's rounding independent of the machine's core count (bitwise determinism per seed).
#: On a loaded 2-core machine, 2 threads make a 200 x 200 batched update orders of magnitude slower
#: (OpenMP threads wait at every barrier).
EXPERIMENT_THREADS = 1


@contextlib.contextmanager
def torch_threads(n: int = EXPERIMENT_THREADS):
    """Run the block with ``torch.set_num_threads(n)``; the previous setting is restored after."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


# -------------------------------------------------------------------- record
def make_record(
    *,
    experiment: str,
    title: str,
    claim: str,
    claim_short: str,
    criteria: Sequence[Criterion],
    metrics: dict,
    config: dict,
    headline: str,
    notes: Iterable[str] = (),
    deviations: Iterable[dict] = (),
) -> dict:
    """The result record (see the module docstring); ``seconds`` and ``figures`` are filled by
    :func:`write_record`. ``deviations``: entries made by :func:`deviation`."""
    verdict, checks = judge(metrics, criteria)
    deviations = list(deviations)
    for d in deviations:
        if set(d) != {"what", "paper", "here", "reason"}:
            raise ValueError(f"make_record: each deviation must have keys what, paper, here, reason; got {sorted(d)}")
    return {
        "experiment": experiment,
        "title": title,
        "claim": claim,
        "claim_short": claim_short,
        "criterion": criterion_text(criteria),
        "verdict": verdict,
        "checks": checks,
        "headline": headline,
        "metrics": metrics,
        "config": dict(config, **env_info()),
        "seconds": None,
        "figures": [],
        "notes": list(notes),
        "deviations": deviations,
    }


def env_info() -> dict:
    from .. import __version__

    return {
        "symfast_version": __version__,
        "torch_version": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }


def jsonable(obj: Any) -> Any:
    """Plain JSON types: tensors and numpy scalars become numbers/lists, non-finite floats None."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return jsonable(obj.tolist())
    if hasattr(obj, "item") and callable(obj.item) and not isinstance(obj, (str, bytes)):
        try:
            return jsonable(obj.item())  # numpy scalar
        except (TypeError, ValueError):
            pass
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_record(record: dict, out_dir: str | Path, *, t0: float, figures: Sequence[str] = ()) -> dict:
    """Fill ``seconds`` (since ``t0``, a ``time.perf_counter()``) and ``figures``, write
    ``result.json`` and ``report.md`` into ``out_dir``; returns the JSON-clean record."""
    out_dir = Path(out_dir)
    record = dict(record)
    record["figures"] = [str(f) for f in figures]
    record["seconds"] = round(time.perf_counter() - t0, 3)
    record = jsonable(record)
    (out_dir / RESULT_FILE).write_text(json.dumps(record, indent=2) + "\n")
    (out_dir / REPORT_FILE).write_text(experiment_markdown(record, heading="#") + "\n")
    return record


def load_record(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())


# ------------------------------------------------------------------- figures
def new_figure(figsize: tuple[float, float], **kwargs):
    """A matplotlib Figure on the Agg canvas (no pyplot, no global state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout="constrained", **kwargs)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig, out_dir: str | Path, name: str, dpi: int = 130) -> str:
    """Save ``fig`` as ``out_dir/name`` (PNG); returns ``name`` (paths in records are relative)."""
    fig.savefig(Path(out_dir) / name, dpi=dpi)
    return name


def verdict_color(verdict: str) -> str:
    return "tab:green" if verdict == REPRODUCED else "tab:red"


# ------------------------------------------------------------------- markdown
def fmt_value(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if v == 0:
            return "0"
        a = abs(v)
        return f"{v:.3g}" if 1e-3 <= a < 1e5 else f"{v:.2e}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(fmt_value(x) for x in v) + "]"
    return str(v)


def md_cell(s: str) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def experiment_markdown(record: dict, *, heading: str = "#", fig_prefix: str = "") -> str:
    """Markdown for one experiment: claim, verdict, checks table, figures, notes, settings."""
    r = record
    lines = [
        f"{heading} {r['experiment']}: {r.get('title', '')}",
        "",
        f"**Claim.** {r['claim']}",
        "",
        f"**Verdict: {r['verdict'].upper()}** ({r.get('headline', '')})",
        "",
        f"**Criterion.** {r['criterion']}",
        "",
        "| check | measured | threshold | passed |",
        "|---|---|---|---|",
    ]
    for c in r.get("checks", []):
        tag = "control (not counted): " if c.get("control") else ""
        lines.append(
            f"| {tag}{md_cell(c['text'])} (`{c['key']}`) | {md_cell(fmt_value(c['measured']))} | "
            f"{c['op']} {md_cell(fmt_value(c['threshold']))} | {'yes' if c['passed'] else '**no**'} |"
        )
    lines.append("")
    cfg = r.get("config", {})
    if cfg.get("quick"):
        lines += [f"**Quick run.** Shorter than the paper's settings; the verdict at the paper's settings is "
                  f"`symfast repro {r['experiment']} --full`.", ""]
    if r.get("deviations"):
        lines += ["**Deviations from the paper.**", "", "| what | paper | here | reason |", "|---|---|---|---|"]
        lines += [f"| {md_cell(d['what'])} | {md_cell(fmt_value(d['paper']))} | {md_cell(fmt_value(d['here']))} | "
                  f"{md_cell(d['reason'])} |" for d in r["deviations"]]
        lines.append("")
    for f in r.get("figures", []):
        lines += [f"![{r['experiment']}: {f}]({fig_prefix}{f})", ""]
    if r.get("notes"):
        lines.append("**Notes.**")
        lines.append("")
        lines += [f"- {n}" for n in r["notes"]]
        lines.append("")
    mode = "quick" if cfg.get("quick") else "full"
    seconds = r.get("seconds")
    threads = cfg.get("torch_threads")
    lines.append(
        f"Run: {mode}, seed {cfg.get('seed')}, {seconds if seconds is not None else '?'} s, "
        f"torch {cfg.get('torch_version')}, {threads} thread{'' if threads == 1 else 's'}. "
        "All settings and measurements are in `result.json`."
    )
    return "\n".join(lines)


def short_claim(record: dict, width: int = 100) -> str:
    claim = record.get("claim_short") or record["claim"]
    return claim if len(claim) <= width else claim[: width - 3].rstrip() + "..."


# ------------------------------------------------------------------- driver
def run_experiment(
    module: Any,
    out_dir: str | Path,
    *,
    quick: bool,
    seed: int,
    progress: bool,
    config: Optional[dict],
    headline: Callable[[dict, dict], str],
    notes: Sequence[str] | Callable[[dict, dict], Sequence[str]] = (),
    criteria: Optional[Callable[[dict, dict], Sequence[Criterion]]] = None,
    deviations: Sequence[dict] | Callable[[dict], Sequence[dict]] = (),
) -> dict:
    """The common ``run()`` of an experiment module.

    ``module`` provides EXPERIMENT, TITLE, CLAIM, CLAIM_SHORT,
    ``make_config(quick, seed, **overrides)``, ``compute(cfg, progress) -> (metrics, plot_data)``
    and ``_plot(record, plot_data, out_dir) -> figure path``, and CRITERIA unless
    ``criteria(metrics, cfg)`` gives them. ``headline(metrics, cfg)`` and, when
    callable, ``notes(metrics, cfg)`` describe the run; ``deviations`` (or ``deviations(cfg)``) lists where
    the run differs from the paper's settings. Runs ``compute`` under
    :func:`torch_threads`, judges the metrics, draws the figure and writes
    ``result.json`` and ``report.md`` into ``out_dir``; returns the record.
    """
    with torch_threads():
        t0 = time.perf_counter()
        cfg = module.make_config(quick, seed, **(config or {}))
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        metrics, plot_data = module.compute(cfg, progress)
        rec = make_record(
            experiment=module.EXPERIMENT, title=module.TITLE, claim=module.CLAIM,
            claim_short=module.CLAIM_SHORT,
            criteria=module.CRITERIA if criteria is None else criteria(metrics, cfg), metrics=metrics, config=cfg,
            headline=headline(metrics, cfg), notes=notes(metrics, cfg) if callable(notes) else notes,
            deviations=deviations(cfg) if callable(deviations) else deviations,
        )
        fig = module._plot(rec, plot_data, out_dir)
        return write_record(rec, out_dir, t0=t0, figures=[fig])
