"""Claims about chaotic runs (training trajectories, SGD chains), stated with a margin.

ATen picks its SIMD kernels per CPU (and by ``ATEN_CPU_CAPABILITY``), so a training run differs in its
last bits from one host to another, and any count or order measured on its trajectory can move by a
little. A test of such a run states its claim as ``value OP threshold`` with the threshold away from
what is measured, never as a strict order or an exact count that such a change can flip.

``assert_margin`` is that assertion. When ``SYMFAST_MARGIN_LOG`` names a file it also appends one JSON
line per check (test, claim, value, threshold, margin), so that the margins can be compared across hosts
and instruction sets::

    SYMFAST_MARGIN_LOG=/tmp/avx2.jsonl ATEN_CPU_CAPABILITY=avx2 python -m pytest tests/experiments tests/train
"""

from __future__ import annotations

import json
import operator
import os

_OPS = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge}


def record_margin(value: float, op: str, threshold: float, what: str) -> float:
    """The margin of value OP threshold (> 0: holds with room; <= 0: fails or holds only at equality), logged
    to SYMFAST_MARGIN_LOG when set."""
    value, threshold = float(value), float(threshold)
    margin = value - threshold if op in (">", ">=") else threshold - value
    log = os.environ.get("SYMFAST_MARGIN_LOG")
    if log:
        test = os.environ.get("PYTEST_CURRENT_TEST", "?").rsplit(" ", 1)[0]
        with open(log, "a") as f:
            f.write(json.dumps({"test": test, "what": what, "value": value, "op": op, "threshold": threshold,
                                "margin": margin}) + "\n")
    return margin


def assert_margin(value: float, op: str, threshold: float, what: str) -> None:
    """assert value OP threshold, naming the claim and its margin."""
    margin = record_margin(value, op, threshold, what)
    assert _OPS[op](float(value), float(threshold)), f"{what}: {value!r} {op} {threshold!r} fails (margin {margin:+.3g})"
