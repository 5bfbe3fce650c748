"""Checks shared by the reproduction tests: a result record is complete, its
verdict follows from its own stated criteria, and its files are written."""

import json

from symfast.experiments import common
from margins import record_margin

RECORD_KEYS = {"experiment", "claim", "verdict", "metrics", "config", "seconds"}


def recomputed_verdict(rec: dict) -> str:
    """The verdict from the record alone: every stated check re-evaluated on the stored metrics."""
    crit = [common.Criterion(c["key"], c["op"], c["threshold"], c["text"], control=c["control"]) for c in rec["checks"]]
    return common.judge(rec["metrics"], crit)[0]


def check_record(rec: dict, out_dir) -> None:
    assert RECORD_KEYS <= set(rec)
    assert rec["verdict"] in (common.REPRODUCED, common.NOT_REPRODUCED)
    assert rec["verdict"] == recomputed_verdict(rec)
    for c in rec["checks"]:  # how far each stated criterion is from flipping the verdict
        if isinstance(c["measured"], (int, float)) and c["op"] in ("<", "<=", ">", ">="):
            record_margin(c["measured"], c["op"], c["threshold"], f"criterion {c['key']} ({rec['experiment']})")
    assert rec["seconds"] > 0 and rec["criterion"].startswith("reproduced iff")
    assert all(set(d) == {"what", "paper", "here", "reason"} and d["reason"] for d in rec["deviations"])
    assert json.loads((out_dir / "result.json").read_text()) == rec
    for f in rec["figures"]:
        assert (out_dir / f).stat().st_size > 20_000, f
    md = (out_dir / "report.md").read_text()
    assert rec["verdict"].upper() in md and all(f in md for f in rec["figures"])
    if rec["config"].get("quick"):  # a quick report says so and names the command of the paper's settings
        assert f"symfast repro {rec['experiment']} --full" in md
