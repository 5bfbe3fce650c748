"""Runs the dcs benchmarks (or reads a pytest-benchmark JSON) and prints the table.

    python benchmarks/report.py                       # run everything, print, write JSON
    python benchmarks/report.py -k "16M and float32"  # only some cases (pytest -k)
    python benchmarks/report.py -k "cuda and (64M or 256M)"   # the GPU targets (CUDA only)
    python benchmarks/report.py --bench group         # the dcs_group benchmark (test_group.py)
    python benchmarks/report.py --bench curvature     # per-sample curvature and stationary_report
    python benchmarks/report.py --json raw.json       # from `pytest benchmarks --benchmark-json=raw.json`
    python benchmarks/report.py --markdown            # the table in README form

For each case: medians of symfast, the eager reference and
torch.compile(reference); speed-ups; the bandwidth symfast achieves
(bytes_moved / median, with bytes_moved the minimum a fused implementation must
move, see ``bench_utils.bytes_moved``), that of a same-traffic device copy, and
their ratio. The JSON record (default ``benchmarks/results/<machine>.json``,
``group-<machine>.json`` for ``--bench group``) names the machine, torch and
symfast versions and the date, and holds the rows.

GPU targets: on CUDA, the masked forward+backward at 64M elements and
more reaches at least ``TARGET_PCT_OF_COPY`` % of the same-traffic copy's
bandwidth and ``TARGET_VS_COMPILED`` x torch.compile(reference). Such rows get
a ``targets`` entry with the verdicts, also printed under the table.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import re
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
IMPLS = ("symfast", "eager", "compiled", "copy")
# --bench: the benchmark module, and the prefix of the record's default name.
BENCHES = {"dcs": ("test_dcs.py", ""), "group": ("test_group.py", "group-"),
           "curvature": ("test_bench_curvature.py", "curvature-")}
TARGET_PCT_OF_COPY = 80.0
TARGET_VS_COMPILED = 1.1
TARGET_MIN_NUMEL = 1 << 26  # 64M


def run_pytest(json_path: Path, keyword: Optional[str], extra: List[str], bench: str = "dcs") -> None:
    cmd = [
        sys.executable, "-m", "pytest", str(HERE / BENCHES[bench][0]), "-q", "-p", "no:cacheprovider",
        f"--benchmark-json={json_path}", "--benchmark-sort=name",
    ]
    if keyword:
        cmd += ["-k", keyword]
    cmd += extra
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(f"report.py: pytest exited with {proc.returncode}; no table written")


def machine_slug(info: dict) -> str:
    """cuda-<gpu> or cpu-<cpu model short>-<cores>c, lower case, dashes."""

    def short(name: str) -> str:
        name = re.sub(r"\((r|tm)\)|\bcpu\b|\bprocessor\b|@.*$|\b\d+-core\b", " ", name, flags=re.I)
        return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")

    if info.get("cuda_device"):
        return f"cuda-{short(info['cuda_device'])}"
    return f"cpu-{short(info.get('cpu_model', 'unknown'))}-{info.get('cores', 0)}c"


def build_rows(raw: dict) -> List[dict]:
    cases: Dict[tuple, Dict[str, dict]] = defaultdict(dict)
    for bench in raw.get("benchmarks", []):
        x = bench.get("extra_info", {})
        if "impl" not in x or "bytes_moved" not in x:
            continue
        # dcs cases have a mask kind, dcs_group cases a dim (and a shape).
        key = (x["op"], x.get("mask"), x.get("dim"), tuple(x.get("shape") or ()), x["numel"], x["dtype"],
               x["device"])
        cases[key][x["impl"]] = {
            "median_s": bench["stats"]["median"],
            "iqr_s": bench["stats"]["iqr"],
            "rounds": bench["stats"]["rounds"],
            "bytes_moved": x["bytes_moved"],
        }

    def ms(entry: Optional[dict]) -> Optional[float]:
        return None if entry is None else entry["median_s"] * 1e3

    def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
        return None if a is None or b is None or b == 0 else a / b

    rows = []
    order = {"forward": 0, "forward+backward": 1}

    def sort_key(k):  # device, op, mask, dim, shape, numel, dtype
        return (k[6], order.get(k[0], 9), str(k[1]), -1 if k[2] is None else k[2], k[3], k[4], k[5])

    for key in sorted(cases, key=sort_key):
        op, mask, dim, shape, numel, dtype, device = key
        impls = cases[key]
        moved = next(iter(impls.values()))["bytes_moved"]
        sym, eag, com, cpy = (ms(impls.get(i)) for i in IMPLS)
        gbps = lambda t: None if t is None else moved / (t * 1e-3) / 1e9  # noqa: E731
        if dim is None:
            head = {"case": f"{'fwd' if op == 'forward' else 'fwd+bwd'} mask={mask}", "op": op, "mask": mask}
        else:
            head = {"case": f"{'fwd' if op.endswith(' forward') else 'fwd+bwd'} dim={dim}"
                    + (" " + "x".join(map(str, shape)) if shape else ""), "op": op, "dim": dim, "shape": list(shape)}
        rows.append({
            **head, "numel": numel, "dtype": dtype, "device": device,
            "bytes_moved": moved,
            "symfast_ms": sym, "eager_ms": eag, "compiled_ms": com, "copy_ms": cpy,
            "speedup_vs_eager": ratio(eag, sym),
            "speedup_vs_compiled": ratio(com, sym),
            "symfast_gbps": gbps(sym), "eager_gbps": gbps(eag), "compiled_gbps": gbps(com),
            "copy_gbps": gbps(cpy),
            "pct_of_copy": None if ratio(cpy, sym) is None else 100 * ratio(cpy, sym),
            "iqr_ms": {i: impls[i]["iqr_s"] * 1e3 for i in impls},
            "rounds": {i: impls[i]["rounds"] for i in impls},
        })
        target = targets_for(rows[-1])
        if target is not None:
            rows[-1]["targets"] = target
    return rows


def build_curvature_rows(raw: dict) -> List[dict]:
    """One row per curvature case (and per stationary_report case): medians and the ratios that the
    benchmark recorded on its symfast / stationary_report entry."""
    cases: Dict[tuple, Dict[str, dict]] = defaultdict(dict)
    for bench in raw.get("benchmarks", []):
        x = bench.get("extra_info", {})
        if x.get("bench") not in ("curvature", "stationary"):
            continue
        key = (x["bench"], x["case"], x.get("dtype"), x.get("threads"), x.get("device"))
        cases[key][x["impl"]] = {"median_s": bench["stats"]["median"], "extra": x}
    rows = []
    for key in sorted(cases, key=lambda k: tuple(str(v) for v in k)):
        kind, case, dtype, threads, device = key
        impls = cases[key]
        main = impls.get("symfast") or impls.get("stationary_report") or {"extra": {}}
        x = main["extra"]
        ms = {f"{i}_ms": impls[i]["median_s"] * 1e3 for i in impls}
        rows.append({
            "case": case if kind == "curvature" else f"stationary_report {case}", "dtype": dtype, "threads": threads,
            "device": device, **ms,
            "cost_per_direction": x.get("cost_per_direction", x.get("cost_vs_fwdbwd")),
            "interleaved_cost_per_direction": x.get("interleaved_cost_per_direction"),
            "speedup_vs_vmap": x.get("speedup_vs_vmap"),
            "interleaved_speedup_vs_vmap": x.get("interleaved_speedup_vs_vmap"),
            "vmap_impl": x.get("vmap_impl"), "path": x.get("path"),
        })
    return rows


CURVATURE_COLUMNS = [
    ("case", "case", "{}"), ("dtype", "dtype", "{}"), ("threads", "thr", "{}"), ("device", "device", "{}"),
    ("fwdbwd_ms", "fwdbwd ms", "{:.2f}"), ("symfast_ms", "symfast ms", "{:.2f}"), ("vmap_ms", "vmap ms", "{:.2f}"),
    ("stationary_report_ms", "report ms", "{:.1f}"),
    ("cost_per_direction", "x fwdbwd/dir", "{:.2f}"), ("interleaved_cost_per_direction", "(interleaved)", "{:.2f}"),
    ("speedup_vs_vmap", "x vmap", "{:.1f}"), ("interleaved_speedup_vs_vmap", "(interleaved)", "{:.1f}"),
    ("path", "symfast path", "{}"),
]


def format_curvature_table(rows: List[dict], markdown: bool) -> str:
    """The curvature rows; ``x fwdbwd/dir`` is symfast / (K x fwdbwd) (stationary_report: / fwdbwd)."""
    head = [h for _, h, _ in CURVATURE_COLUMNS]
    body = [[("-" if r.get(k) is None else f.format(r[k])) for k, _, f in CURVATURE_COLUMNS] for r in rows]
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        return "\n".join(lines + ["| " + " | ".join(b) + " |" for b in body])
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([fmt(head)] + [fmt(b) for b in body])


def targets_for(row: dict) -> Optional[dict]:
    """Verdicts of the GPU targets for a CUDA dcs forward+backward row of 64M elements or more, else None."""
    if not (row["device"].startswith("cuda") and row["op"] == "forward+backward" and row.get("mask") is not None
            and row["numel"] >= TARGET_MIN_NUMEL):
        return None
    pct, vs = row["pct_of_copy"], row["speedup_vs_compiled"]
    return {
        "pct_of_copy_min": TARGET_PCT_OF_COPY, "pct_of_copy_ok": None if pct is None else pct >= TARGET_PCT_OF_COPY,
        "vs_compiled_min": TARGET_VS_COMPILED, "vs_compiled_ok": None if vs is None else vs >= TARGET_VS_COMPILED,
    }


def format_targets(rows: List[dict]) -> str:
    """One line per row that has GPU targets: measured against wanted, PASS/FAIL."""
    lines = []
    for r in rows:
        t = r.get("targets")
        if t is None:
            continue
        ok = bool(t["pct_of_copy_ok"]) and bool(t["vs_compiled_ok"])
        pct = "-" if r["pct_of_copy"] is None else f"{r['pct_of_copy']:.0f}%"
        vs = "-" if r["speedup_vs_compiled"] is None else f"{r['speedup_vs_compiled']:.2f}x"
        lines.append(f"target {'PASS' if ok else 'FAIL'}: {r['case']} {human_numel(r['numel'])} {r['dtype']} "
                     f"{r['device']}: {pct} of copy (>= {t['pct_of_copy_min']:.0f}%), {vs} compiled "
                     f"(>= {t['vs_compiled_min']}x)")
    return "\n".join(lines)


COLUMNS = [
    ("case", "case", "{}"), ("numel", "numel", "{}"), ("dtype", "dtype", "{}"), ("device", "dev", "{}"),
    ("symfast_ms", "symfast ms", "{:.2f}"), ("eager_ms", "eager ms", "{:.2f}"),
    ("compiled_ms", "compiled ms", "{:.2f}"), ("speedup_vs_eager", "x eager", "{:.2f}"),
    ("speedup_vs_compiled", "x compiled", "{:.2f}"), ("symfast_gbps", "symfast GB/s", "{:.1f}"),
    ("copy_gbps", "copy GB/s", "{:.1f}"), ("pct_of_copy", "% copy", "{:.0f}"),
]


def human_numel(n: int) -> str:
    for unit, size in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= size and n % size == 0:
            return f"{n // size}{unit}"
    return str(n)


def format_table(rows: List[dict], markdown: bool) -> str:
    cells = [[h for _, h, _ in COLUMNS]]
    for r in rows:
        line = []
        for key, _, fmt in COLUMNS:
            val = r[key]
            if key == "numel":
                val = human_numel(val)
            line.append("-" if val is None else fmt.format(val))
        cells.append(line)
    if markdown:
        out = ["| " + " | ".join(cells[0]) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
        out += ["| " + " | ".join(c) + " |" for c in cells[1:]]
        return "\n".join(out)
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
    text = []
    for j, c in enumerate(cells):
        text.append("  ".join(s.ljust(w) if i < 4 else s.rjust(w) for i, (s, w) in enumerate(zip(c, widths))))
        if j == 0:
            text.append("  ".join("-" * w for w in widths))
    return "\n".join(text)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", type=Path, help="read this pytest-benchmark JSON instead of running pytest")
    p.add_argument("--out", type=Path, help="where to write the record (default benchmarks/results/<machine>.json)")
    p.add_argument("--raw-out", type=Path, help="also keep pytest-benchmark's own JSON here (when running)")
    p.add_argument("-k", dest="keyword", help="pytest -k expression selecting cases (when running)")
    p.add_argument("--bench", choices=sorted(BENCHES), default="dcs",
                   help="which benchmark module to run: dcs (test_dcs.py, default), group (test_group.py) "
                        "or curvature (test_bench_curvature.py)")
    p.add_argument("--markdown", action="store_true", help="print a markdown table")
    p.add_argument("pytest_args", nargs="*", help="extra pytest arguments, after --")
    args = p.parse_args(argv)

    if args.json is not None:
        if args.keyword or args.pytest_args:
            p.error("-k and pytest arguments only apply when report.py runs pytest (no --json)")
        raw = json.loads(args.json.read_text())
        source = str(args.json)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(args.raw_out) if args.raw_out else Path(tmp) / "benchmarks.json"
            run_pytest(path.resolve(), args.keyword, args.pytest_args, args.bench)
            raw = json.loads(path.read_text())
        source = str(args.raw_out) if args.raw_out else "pytest run by report.py"

    # Written by benchmarks/conftest.py into pytest-benchmark's machine_info.
    info = raw.get("machine_info", {}).get("symfast")
    if info is None:  # a JSON from elsewhere: describe what we can, from this machine
        sys.path.insert(0, str(HERE))
        from bench_utils import machine_description

        info = dict(machine_description(), note="described by report.py, not by the benchmark run")
    curvature = args.bench == "curvature"
    rows = build_curvature_rows(raw) if curvature else build_rows(raw)
    if not rows:
        raise SystemExit(f"report.py: no {args.bench} benchmarks in the results (check -k)")

    record = {
        "machine": {k: v for k, v in info.items() if k not in ("torch", "symfast")},
        "machine_slug": machine_slug(info),
        "torch": info.get("torch"),
        "symfast": info.get("symfast"),
        "date": raw.get("datetime") or _dt.datetime.now(_dt.timezone.utc).isoformat(),
        "source": source,
        "bytes_moved_note": "minimal DRAM traffic of a fused implementation; see benchmarks/bench_utils.py",
        "rows": rows,
    }
    out = args.out or HERE / "results" / f"{BENCHES[args.bench][1]}{record['machine_slug']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")

    cores = info.get("cores")
    device = f", GPU {info['cuda_device']}" if info.get("cuda_device") else ""
    print(f"\nsymfast {record['symfast']}, torch {record['torch']}, {info.get('cpu_model')} "
          f"({cores} cores{device}), {record['date']}")
    if info.get("env"):
        print("environment: " + " ".join(f"{k}={v}" for k, v in info["env"].items()))
    foreign = info.get("foreign_cpu_fraction")
    if foreign is not None:
        print(f"CPU taken by other processes during the run: {100 * foreign:.1f}% of the machine")
        if foreign > 0.05:
            print("warning: the machine was shared during the run; timings are noisy (rerun when idle)")
    print(format_curvature_table(rows, args.markdown) if curvature else format_table(rows, args.markdown))
    targets = "" if curvature else format_targets(rows)
    if targets:
        print("\n" + targets)
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
