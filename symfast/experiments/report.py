"""The combined report: ``DIR/report.md`` with a summary table of claims and verdicts, every figure
embedded, and the per-experiment details, built from the ``DIR/*/result.json`` records.

``symfast demo`` and ``symfast repro`` rebuild it after every run, so it always reflects every
experiment found in ``DIR``. Rebuild by hand with ``python -m symfast.experiments.report DIR``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Iterable, Optional, Sequence

from . import EXPERIMENTS
from .common import REPORT_FILE, RESULT_FILE, experiment_markdown, fmt_value, load_record, md_cell, short_claim


def collect(out_root: str | Path) -> list[dict]:
    """The records under ``out_root`` (one sub-folder per experiment), in registry order."""
    out_root = Path(out_root)
    order = {e.name: i for i, e in enumerate(EXPERIMENTS)}
    recs = []
    for path in sorted(out_root.glob(f"*/{RESULT_FILE}")):
        rec = load_record(path)
        if isinstance(rec, dict) and "experiment" in rec and "verdict" in rec:
            recs.append(rec)
    return sorted(recs, key=lambda r: (order.get(r["experiment"], len(order)), r["experiment"]))


def _mode(rec: dict) -> str:
    return "quick" if rec.get("config", {}).get("quick") else "full"


def summary_markdown(records: Sequence[dict]) -> str:
    lines = [
        "| experiment | claim | verdict | measured | figure | time |",
        "|---|---|---|---|---|---|",
    ]
    for r in records:
        name = r["experiment"]
        fig = r["figures"][0] if r.get("figures") else None
        fig_cell = f"[{fig}]({name}/{fig})" if fig else ""
        verdict = r["verdict"] if r["verdict"] == "reproduced" else f"**{r['verdict']}**"
        lines.append(
            f"| [{name}](#{_anchor(r)}) | {md_cell(short_claim(r))} | {verdict} | {md_cell(r.get('headline', ''))} "
            f"| {fig_cell} | {r.get('seconds', 0):.0f} s ({_mode(r)}) |"
        )
    return "\n".join(lines)


#: The settings each verdict is judged at, as config keys of its record (the README table shows their values).
JUDGED_AT = {
    "fig1-left": ("primary_noise_std", "steps", "batch_size", "zero_tol"),
    "fig1-mid": ("lr", "steps", "batch_size", "rank_tol"),
    "fig1-right": ("lr", "momentum", "batch_size", "steps", "primary_weight_decay"),
    "fig3": ("steps_per_task", "batch_size", "lr", "settings"),
    "dcs-cnn": ("lr", "lr_schedule", "momentum", "batch_size", "steps", "vanilla_weight_decay", "primary_alpha",
                "zero_threshold"),
    "mf-weight-decay": ("d", "weight_decays_used", "steps", "rank_tol"),
    "theorems123": ("weight_decays", "steps", "lr"),
    "fisher": ("hidden", "samples", "points"),
    "adam-collapse": ("weight_decays", "lr", "batch_size", "steps", "seeds"),
    "general-p": ("alpha", "lr", "steps"),
    "fig2": ("weight_decay", "lr", "steps"),
}


def _setting(v) -> str:
    if isinstance(v, list) and v and isinstance(v[0], dict):  # fig3's settings
        return ", ".join(f"{d['weight_decay']:g} {d['mode']}" for d in v)
    if isinstance(v, dict):  # one value per case or optimizer
        return ", ".join(f"{k} {_setting(x)}" for k, x in v.items())
    if isinstance(v, float):
        return f"{v:.3g}"
    if isinstance(v, list):
        return "[" + ", ".join(_setting(x) for x in v) + "]"
    return str(v)


def readme_markdown(records: Sequence[dict]) -> str:
    """The README's reproduction table: per verdict the run (quick or full), the settings it was judged at and
    the deviations from the paper, all read from the records."""
    lines = ["| experiment | run | verdict | judged at | deviations from the paper | measured |",
             "|---|---|---|---|---|---|"]
    for r in records:
        cfg = r.get("config", {})
        verdict = r["verdict"] if r["verdict"] == "reproduced" else f"**{r['verdict']}**"
        if "memory_verdict" in r:
            mv = r["memory_verdict"]["verdict"]
            verdict += "; memory: " + (mv if mv == "reproduced" else f"**{mv}**")
        keys = JUDGED_AT.get(r["experiment"], ())
        judged = (", ".join(f"{k} {_setting(cfg[k])}" for k in keys if k in cfg)
                  or "the record's config (not audited against the paper here)")
        devs = "; ".join(f"{d['what']}: {fmt_value(d['paper'])} → {fmt_value(d['here'])}"
                         for d in r.get("deviations", [])) or "none recorded"
        lines.append(f"| `{r['experiment']}` | {_mode(r)}, {r.get('seconds', 0):.0f} s | {verdict} | "
                     f"{md_cell(judged)} | {md_cell(devs)} | {md_cell(r.get('headline', ''))} |")
    return "\n".join(lines)


def _anchor(rec: dict) -> str:
    # GitHub's heading anchors: lowercase, spaces to '-', punctuation dropped.
    head = f"{rec['experiment']}: {rec.get('title', '')}".lower()
    keep = "".join(ch for ch in head if ch.isalnum() or ch in " -_")
    return keep.replace(" ", "-")


def combined_markdown(records: Sequence[dict], *, command: Optional[str] = None) -> str:
    n_ok = sum(r["verdict"] == "reproduced" for r in records)
    lines = [
        "# symfast: reproductions of 'Symmetry Leads to Structured Constraint of Learning'",
        "",
        f"{n_ok} of {len(records)} claims reproduced. Every verdict is computed from the measured numbers by "
        "the criterion stated with it; nothing here is written by hand.",
    ]
    if command:
        lines += ["", f"Produced by `{command}`."]
    lines += ["", "## Summary", "", summary_markdown(records), ""]
    ran = {r["experiment"] for r in records}
    not_run = [e for e in EXPERIMENTS if e.name not in ran]
    if not_run:
        lines += ["Not in this report:", ""]
        for e in not_run:
            lines.append(f"- `{e.name}` ({e.title}): not run here (`symfast repro {e.name}`)")
        lines.append("")
    for r in records:
        lines += [experiment_markdown(r, heading="##", fig_prefix=f"{r['experiment']}/"), ""]
    return "\n".join(lines)


def write_report(out_root: str | Path, *, command: Optional[str] = None,
                 records: Optional[Iterable[dict]] = None) -> Path:
    """Write ``out_root/report.md`` from ``records`` (default: every record found under ``out_root``)."""
    out_root = Path(out_root)
    recs = list(records) if records is not None else collect(out_root)
    path = out_root / REPORT_FILE
    path.write_text(combined_markdown(recs, command=command) + "\n")
    return path


def summary_text(records: Sequence[dict], width: int = 110) -> str:
    """Plain-text summary table for the terminal: experiment, verdict, time, claim, and the numbers."""
    lines = [f"{'experiment':<11} {'verdict':<15} {'time':>7}  claim / measured", "-" * width]
    for r in records:
        lines.append(f"{r['experiment']:<11} {r['verdict']:<15} {r.get('seconds', 0):>6.1f}s  {short_claim(r, 110)}")
        lines.append(f"{'':<37}measured: {r.get('headline', '')}")
    n_ok = sum(r["verdict"] == "reproduced" for r in records)
    lines += ["-" * width, f"{n_ok} of {len(records)} claims reproduced"]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    readme = "--readme" in args
    args = [a for a in args if a != "--readme"]
    if len(args) != 1:
        print("usage: python -m symfast.experiments.report DIR [--readme]", file=sys.stderr)
        return 2
    if readme:  # the README's reproduction table from the records under DIR
        print(readme_markdown(collect(args[0])))
        return 0
    path = write_report(args[0])
    print(summary_text(collect(args[0])))
    print(f"report: {path}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
