#!/usr/bin/env bash
# GPU check of symfast: build the extension with CUDA, run the test suite with a GPU visible,
# compute-sanitizer over the CUDA op tests, the GPU benchmarks, and a summary, all within one time
# budget.
#
# ------------------------------------------------------------------------------------------- usage
# On a machine with an NVIDIA GPU (sm_90 by default: H100 or H200), the CUDA toolkit (nvcc,
# compute-sanitizer, cuobjdump) and a CUDA build of torch with pytest, pytest-benchmark, scipy,
# scikit-learn, matplotlib and tqdm (pytest-xdist and pytest-timeout are used when installed), from
# the repository root:
#
#     bash benchmarks/gpu_check.sh
#     GPU_CHECK_STEPS='bench_group bench_curv' bash benchmarks/gpu_check.sh    # some steps only
#
# Time: the script keeps its own budget (GPU_CHECK_BUDGET_S, default 360 s). Each step runs under
# `timeout` for at most its cap or what is left of the budget, and a step that no longer fits is not
# started (BUDGET in the summary), so the script ends within the budget with its summary written.
# A rerun on the same machine skips the build when setup.py, pyproject.toml and csrc/ are unchanged
# (a stamp in build/, an ignored folder) and finds Triton/Inductor's compile cache warm.
#
# Dry run without a GPU, with the CPU build that is already in the checkout (checks the plumbing:
# step logic, logs, JSON records, summary; tiny CPU selections; never writes benchmarks/results/):
#     GPU_CHECK_DRY=1 OMP_NUM_THREADS=1 bash benchmarks/gpu_check.sh
#
# ----------------------------------------------------------------------------------------- the steps
#   env         nvidia-smi, versions, the results' machine slug
#   build       pip install --no-build-isolation --no-deps -e . with SYMFAST_CUDA=1,
#               TORCH_CUDA_ARCH_LIST=9.0, MAX_JOBS=nproc; checks that every op has a CUDA kernel,
#               and reports the SASS targets and each kernel's registers and spills
#   tests       the whole suite, CUDA visible (pytest-xdist -n 8), in parallel with:
#   memcheck    compute-sanitizer memcheck over the CUDA op tests of tests/ops/test_dcs.py and
#               tests/ops/test_dcs_group.py (float32 and bfloat16 values, backward and jvp ops, the
#               training path, non-contiguous inputs, the CPU/CUDA cross-checks), with the caching
#               allocator off (PYTORCH_NO_CUDA_MEMORY_CACHING) so that overruns reach the sanitizer
#   racecheck   compute-sanitizer racecheck over the dcs_group CUDA tests (the kernels with
#               shared-memory reductions: every shape's forward and backward, the backward op, the
#               cross-checks; float32 and bfloat16)
#   bench_dcs   benchmarks/report.py -k "cuda and (64M or 256M)": masked fwd+bwd, 64M and 256M,
#               float32/bfloat16, symfast/eager/compiled/copy; targets >= 80 % of copy bandwidth
#               and >= 1.1x torch.compile
#   bench_train ResNet18 training step on CUDA, batch 128: plain, symfast and eager (elementwise),
#               symfast (group): step time and peak memory
#   bench_group benchmarks/report.py --bench group -k cuda (4096x4096, dim 0 and 1)
#   bench_curv  per-sample curvature engine on CUDA (benchmarks/test_bench_curvature.py,
#               -k "cuda and not compiled": torch.compile of the vmap recipe takes a minute cold;
#               its CPU numbers are in the README)
# The tests and the two sanitizer runs are correctness checks and share the phase (GPU and cores);
# the benchmarks run alone afterwards, so that nothing else competes for the GPU. Why the whole suite:
# tests/matrix.py's DEVICES adds CUDA cases to the op, conversion and layer tests, and some code picks the GPU by itself when one is visible (the CLI's train
# and repro commands: test_train, test_repro_cifar), so "-k cuda" alone would miss some; with xdist
# the whole suite costs about what "-k cuda" costs in one process. Without pytest-xdist it falls
# back to one process.
#
# ------------------------------------------------------------------------- what is written to $OUT
#   summary.txt                      PASS/FAIL per step, the targets against the measured numbers
#   build.log                        env, build (pip -v, ptxas -v), kernel registration, cuobjdump
#   tests.log                        the test suite, then the memcheck and racecheck runs
#   bench.log                        every benchmark's output, nvidia-smi before and after
#   <slug>.json                      benchmarks/results/<slug>.json (report.py record of bench_dcs)
#   group-<slug>.json                benchmarks/results/group-<slug>.json (bench_group)
#   training_step-<slug>.json        benchmarks/results/training_step-<slug>.json (bench_train)
#   curvature-<slug>.json            pytest-benchmark's raw JSON of bench_curv
# with <slug> the machine's name from report.machine_slug, e.g. cuda-nvidia-h100-80gb-hbm3. Copy
# the JSONs into benchmarks/results/ of the checkout to record them.
#
# Environment: OUT (default ./gpu_out), GPU_CHECK_DRY=1, GPU_CHECK_STEPS (default: all, in the order
# above), GPU_CHECK_BUDGET_S (360), GPU_CHECK_BENCH_SECONDS (0.5: SYMFAST_BENCH_SECONDS, timed seconds
# per benchmark; GPU medians are steady), GPU_CHECK_XDIST (8 workers), PYTHON (python3), TORCH_CUDA_ARCH_LIST (9.0), MAX_JOBS.
# Summary statuses: PASS, FAIL, TIMEOUT (ran out of its time), BUDGET (not started: too little time
# left), NOTRUN (an earlier step failed), SKIP (a dry run's stand-in). Exit status 0 when the overall
# verdict is PASS (every step wanted ran and passed; the performance targets are reported, not part of
# it), else 1.
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
ROOT=$PWD
OUT=${OUT:-$ROOT/gpu_out}
mkdir -p "$OUT" || exit 2
OUT=$(cd "$OUT" && pwd)
DRY=${GPU_CHECK_DRY:-0}
BUDGET=${GPU_CHECK_BUDGET_S:-360}
ALL_STEPS="build tests memcheck racecheck bench_dcs bench_train bench_group bench_curv"
STEPS=" ${GPU_CHECK_STEPS:-$ALL_STEPS} "
BENCH_SECONDS=${GPU_CHECK_BENCH_SECONDS:-0.5}
XDIST=${GPU_CHECK_XDIST:-8}
PY=${PYTHON:-python3}
RESERVE=15            # seconds kept for the summary
PHASE_CAP=150         # tests + sanitizers, in parallel
T0=$SECONDS
STATE=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX") || exit 2
trap 'rm -rf "$STATE"' EXIT
export PYTHONUNBUFFERED=1
CORES=$(env -u OMP_NUM_THREADS nproc)  # nproc alone obeys OMP_NUM_THREADS

MEMCHECK_K='cuda and (dtype0 or dtype3) and (test_forward_and_backward_match_reference and (True or test_dcs_group) or test_backward_op_matches_reference or test_jvp_op_matches_reference or test_training_path_equals_the_function_path) or test_cpu_and_cuda_agree or cuda and test_non_contiguous'
RACECHECK_K='cuda and (dtype0 or dtype3) and (test_forward_and_backward_match_reference or test_backward_op_matches_reference or test_cpu_and_cuda_agree)'

elapsed() { echo $((SECONDS - T0)); }
left() { echo $((BUDGET - (SECONDS - T0))); }
want() { [[ $STEPS == *" $1 "* ]]; }
say() { printf '[gpu_check +%ss] %s\n' "$(elapsed)" "$*"; }
# record STEP STATUS SECONDS NOTE
record() {
  printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "${4//$'\n'/ }" >>"$STATE/steps.tsv"
  say "$1: $2 ($3 s) $4"
}
section() { printf '\n===== %s (+%ss) =====\n' "$2" "$(elapsed)" >>"$1"; }

# run_capped CAP MIN LOG CMD...: CMD under `timeout`, for CAP seconds or what is left of the budget;
# 125 without running when less than MIN seconds are left; 124 when it ran out of time. SIGINT first,
# so that pytest still prints which tests failed.
run_capped() {
  local cap=$1 min=$2 log=$3 avail
  shift 3
  avail=$(($(left) - RESERVE))
  if ((avail < min)); then
    echo "(not run: ${avail}s of the budget left, ${min}s needed) $*" >>"$log"
    return 125
  fi
  ((cap > avail)) && cap=$avail
  printf '+ [timeout %ss]' "$cap" >>"$log"
  printf ' %q' "$@" >>"$log"
  echo >>"$log"
  timeout -s INT -k 15 "$cap" "$@" >>"$log" 2>&1
}

# status_of RC: PASS / TIMEOUT / BUDGET (not run: too little time left) / FAIL
status_of() {
  case $1 in
    0) echo PASS ;;
    124) echo TIMEOUT ;;
    125) echo BUDGET ;;
    *) echo FAIL ;;
  esac
}

# ------------------------------------------------------------------------------------------- env
step_env() {
  local log=$OUT/build.log
  section "$log" "env"
  {
    echo "date: $(date -u +%FT%TZ)  host: $(hostname)  cores: $CORES  dry: $DRY  budget: ${BUDGET}s"
    echo "steps:$STEPS"
    git log -1 --format='commit: %H %s' 2>/dev/null || true
    git status --short 2>/dev/null | head -30 || true
    if command -v nvidia-smi >/dev/null 2>&1; then
      nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,clocks.sm,clocks.max.sm,clocks.mem,temperature.gpu,power.draw,utilization.gpu --format=csv 2>&1
    else
      echo "no nvidia-smi"
    fi
    command -v nvcc >/dev/null 2>&1 && nvcc --version | tail -2
    echo "python: $(command -v "$PY")"
  } >>"$log" 2>&1
  # The machine slug the benchmark records are named after (report.machine_slug).
  "$PY" - "$STATE/slug" >>"$log" 2>&1 <<'EOF'
import importlib.util
import sys

import torch

sys.path.insert(0, "benchmarks")
from report import machine_slug  # noqa: E402

cuda = torch.cuda.is_available()
info = {"cuda_device": torch.cuda.get_device_name(0) if cuda else None}
if not cuda:
    from bench_utils import _cpu_model  # noqa: E402
    import os

    info.update(cpu_model=_cpu_model(), cores=len(os.sched_getaffinity(0)))
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuda available: {cuda}"
      + (f", {info['cuda_device']}, capability {torch.cuda.get_device_capability(0)}" if cuda else ""))
for mod in ("pytest", "pytest_benchmark", "xdist", "pytest_timeout", "scipy", "sklearn", "matplotlib", "tqdm"):
    print(f"  {mod}: {'yes' if importlib.util.find_spec(mod) else 'MISSING'}")
open(sys.argv[1], "w").write(machine_slug(info) + ("\n" if cuda else "\ncpu\n"))
EOF
  SLUG=$(head -n 1 "$STATE/slug" 2>/dev/null)
  if [[ -z $SLUG ]]; then
    record env FAIL 0 "python/torch did not start (build.log)"
    return 1
  fi
  if [[ $DRY != 1 ]] && grep -qx cpu "$STATE/slug"; then
    record env FAIL "$(elapsed)" "torch sees no CUDA device (build.log)"
    return 1
  fi
  record env PASS "$(elapsed)" "slug $SLUG"
}

# ----------------------------------------------------------------------------------------- build
source "$(dirname "${BASH_SOURCE[0]}")/../.ci/nvcc.sh"  # resolve_nvcc: symlinks and exec-wrappers to the real nvcc

check_build() {  # imports symfast from this checkout; lists the ops without a kernel for $1 (CPU/CUDA)
  "$PY" - "$1" <<'EOF'
import os
import sys

import torch

import symfast

here = os.path.realpath(symfast.__file__)
if not here.startswith(os.path.realpath(os.getcwd()) + os.sep):
    raise SystemExit(f"symfast imported from {here}, not from this checkout")
ops = ("dcs", "dcs_backward", "dcs_jvp", "dcs_group", "dcs_group_backward", "dcs_group_jvp")
missing = [op for op in ops if not torch._C._dispatch_has_kernel_for_dispatch_key(f"symfast::{op}", sys.argv[1])]
print(f"symfast from {os.path.dirname(here)}: {len(ops) - len(missing)}/{len(ops)} ops have a {sys.argv[1]} kernel"
      + (f"; missing: {', '.join(missing)}" if missing else ""))
sys.exit(1 if missing else 0)
EOF
}

ptxas_summary() {  # one line from the `ptxas -v` reports in a build log
  "$PY" - "$1" <<'EOF'
import re
import sys

text = open(sys.argv[1], errors="replace").read()
# "N bytes stack frame, N bytes spill stores, N bytes spill loads", "Used N registers, ..."
props = re.findall(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", text)
regs = [int(r) for r in re.findall(r"Used (\d+) registers", text)]
if not regs:
    print("ptxas: no report")
else:
    spills = sum(1 for st, ss, sl in props if int(ss) or int(sl))
    stack = sum(1 for st, ss, sl in props if int(st))
    print(f"ptxas: {len(regs)} kernels, max {max(regs)} registers, {spills} spilling, {stack} with a stack frame")
EOF
}

step_build() {
  local log=$OUT/build.log t=$SECONDS rc note stamp so
  section "$log" "build"
  if [[ $DRY == 1 ]]; then
    note=$(check_build CPU 2>>"$log") && record build "SKIP" $((SECONDS - t)) "dry run: existing CPU build used; $note" \
      || { record build FAIL $((SECONDS - t)) "dry run: the existing build does not import: $note"; return 1; }
    return 0
  fi
  if [[ -z ${CUDA_HOME:-} ]]; then
    if command -v nvcc >/dev/null 2>&1; then
      CUDA_HOME=$(dirname "$(dirname "$(resolve_nvcc "$(command -v nvcc)")")")
    elif [[ -x /usr/local/cuda/bin/nvcc ]]; then
      CUDA_HOME=/usr/local/cuda
    fi
  fi
  if [[ -z ${CUDA_HOME:-} || ! -x $CUDA_HOME/bin/nvcc ]]; then
    record build FAIL $((SECONDS - t)) "no nvcc found (CUDA_HOME=${CUDA_HOME:-unset})"
    return 1
  fi
  export CUDA_HOME PATH=$CUDA_HOME/bin:$PATH
  export SYMFAST_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-$CORES}
  echo "CUDA_HOME=$CUDA_HOME TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS" >>"$log"
  # Skip the build when nothing it depends on changed since the last one on this machine.
  stamp=$( { cat setup.py pyproject.toml csrc/*.cpp csrc/*.h csrc/cpu/* csrc/cuda/*;
             echo "$TORCH_CUDA_ARCH_LIST ${SYMFAST_DEBUG:-0} $("$PY" -c 'import torch; print(torch.__version__)')"; } \
           2>/dev/null | sha256sum | cut -d' ' -f1)
  if [[ -f build/gpu_check.stamp && $(cat build/gpu_check.stamp) == "$stamp" ]] && note=$(check_build CUDA 2>>"$log"); then
    echo "sources unchanged since the last build on this machine: reused. $note" >>"$log"
    record build PASS $((SECONDS - t)) "reused (sources unchanged); $note"
    return 0
  fi
  rm -f build/gpu_check.stamp
  # ptxas -v: registers, stack frame and spills of every kernel, in the log (verbosity only: the
  # code is the same). nvcc reads NVCC_APPEND_FLAGS itself.
  export NVCC_APPEND_FLAGS="${NVCC_APPEND_FLAGS:-} -Xptxas=-v"
  run_capped 300 60 "$log" "$PY" -m pip install --no-build-isolation --no-deps --no-index -v -e .
  rc=$?
  if ((rc != 0 && rc != 124 && rc != 125)) && ! grep -q 'building CPU + CUDA extension' "$log"; then
    # pip failed before setup.py built anything (an old setuptools without PEP 660, say): build in place.
    echo "pip install -e . failed before building; falling back to setup.py build_ext --inplace" >>"$log"
    run_capped 300 60 "$log" "$PY" setup.py build_ext --inplace
    rc=$?
  fi
  unset NVCC_APPEND_FLAGS
  if ((rc != 0)); then
    # The first errors explain the rest, and are often far above the log's tail.
    section "$log" "first errors"
    grep -m 15 -E '(error:|#error|error #)' "$log" >"$STATE/first-errors" 2>/dev/null
    cat "$STATE/first-errors" >>"$log"
    record build "$(status_of $rc)" $((SECONDS - t)) \
      "pip install -e . exited $rc; first errors: $(head -n 3 "$STATE/first-errors" | tr -s ' ' | cut -c1-300 | tr '\n' '|')"
    return 1
  fi
  grep -q 'building CPU + CUDA extension' "$log" || { record build FAIL $((SECONDS - t)) "setup.py did not build the CUDA extension"; return 1; }
  if ! note=$(check_build CUDA 2>>"$log"); then
    echo "$note" >>"$log"
    record build FAIL $((SECONDS - t)) "$note"
    return 1
  fi
  echo "$note" >>"$log"
  mkdir -p build && echo "$stamp" >build/gpu_check.stamp
  # What the compiler made: SASS targets, and per kernel registers / stack frame / shared memory.
  so=$(ls symfast/_C*.so 2>/dev/null | head -n 1)
  local warnings arch usage ptxas
  warnings=$(grep -cE '(:[0-9]+(:[0-9]+)?: warning:|\([0-9]+\): warning)' "$log" || true)
  ptxas=$(ptxas_summary "$log")
  if [[ -n $so ]] && command -v cuobjdump >/dev/null 2>&1; then
    section "$log" "cuobjdump $so"
    cuobjdump --list-elf "$so" >>"$log" 2>&1
    arch=$(cuobjdump --list-elf "$so" 2>/dev/null | grep -oE 'sm_[0-9]+a?' | sort -u | tr '\n' ' ')
    cuobjdump --dump-resource-usage "$so" >"$STATE/usage.txt" 2>&1
    cat "$STATE/usage.txt" >>"$log"
    usage=$("$PY" - "$STATE/usage.txt" <<'EOF'
import re
import sys

funcs = re.findall(r"Function ([^:\s]+):\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", open(sys.argv[1]).read())
if not funcs:
    print("resource usage: not parsed")
else:
    spill = [f for f in funcs if int(f[2]) > 0 or int(f[4]) > 0]
    print(f"{len(funcs)} kernels, max {max(int(f[1]) for f in funcs)} registers, "
          f"{len(spill)} with a stack frame or local memory, max {max(int(f[3]) for f in funcs)} B static shared")
EOF
)
  fi
  record build PASS $((SECONDS - t)) "built (SASS: ${arch:-?}); $note; $warnings compiler warnings; ${ptxas:-}; ${usage:-}"
}

# ----------------------------------------------------------------------------------------- tests
step_tests() {
  local log=$OUT/tests.log t=$SECONDS rc args note
  section "$log" "tests"
  args=(-q -p no:cacheprovider -rfEs --durations=15 --junitxml="$STATE/tests.xml")
  if [[ $DRY == 1 ]]; then
    args+=(tests/ops/test_dcs.py tests/ops/test_dcs_group.py -k "test_opcheck or test_cpu_and_cuda_agree or test_compile_fullgraph")
  else
    args+=(tests)
  fi
  if "$PY" -c 'import xdist' 2>/dev/null && ((XDIST > 1)); then args+=(-n "$XDIST"); fi
  if "$PY" -c 'import pytest_timeout' 2>/dev/null; then args+=(--timeout 120); fi
  # Per worker: 2 OpenMP threads, and Inductor compiling in-process (8 workers x a pool of
  # compile workers each would flood the machine).
  OMP_NUM_THREADS=2 TORCHINDUCTOR_COMPILE_THREADS=1 run_capped $PHASE_CAP 30 "$log" "$PY" -m pytest "${args[@]}"
  rc=$?
  note=$("$PY" - "$STATE/tests.xml" <<'EOF'
import collections
import sys
import xml.etree.ElementTree as ET

try:
    cases = list(ET.parse(sys.argv[1]).getroot().iter("testcase"))
except (OSError, ET.ParseError):
    print("no junit record (pytest did not finish)")
    raise SystemExit(0)
count, cuda, nocuda = collections.Counter(), collections.Counter(), 0
for c in cases:
    kinds = [ch.tag for ch in c if ch.tag in ("failure", "error", "skipped")]
    outcome = {"failure": "failed", "error": "errors", "skipped": "skipped"}.get(kinds[0] if kinds else "", "passed")
    count[outcome] += 1
    if "cuda" in c.get("name", ""):
        cuda[outcome] += 1
    if outcome == "skipped" and "no CUDA device" in "".join(ch.get("message", "") for ch in c):
        nocuda += 1
fmt = lambda c: ", ".join(f"{c[k]} {k}" for k in ("passed", "failed", "errors", "skipped") if c[k]) or "none"
bad = [f"{c.get('classname', '').rsplit('.', 1)[-1]}::{c.get('name')}" for c in cases
       if any(ch.tag in ("failure", "error") for ch in c)]
more = f"; failing: {', '.join(bad[:8])}" + (f" and {len(bad) - 8} more" if len(bad) > 8 else "") if bad else ""
print(f"{fmt(count)}; cuda-named: {fmt(cuda)}; skipped for want of CUDA: {nocuda}{more}")
EOF
)
  local status
  status=$(status_of $rc)
  if [[ $status == PASS && $DRY != 1 && $note != *"want of CUDA: 0"* ]]; then
    status=FAIL
    note="$note (CUDA tests were skipped)"
  fi
  [[ $DRY == 1 && $status == PASS ]] && note="dry run, tiny CPU selection: $note"
  record tests "$status" $((SECONDS - t)) "$note"
}

# ------------------------------------------------------------------------------------- sanitizers
find_sanitizer() {
  local c
  for c in "$(command -v compute-sanitizer 2>/dev/null)" "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer" \
           "${CUDA_HOME:-/usr/local/cuda}/compute-sanitizer/compute-sanitizer"; do
    [[ -n $c && -x $c ]] && { echo "$c"; return 0; }
  done
  return 1
}

# step_sanitizer TOOL LOG -- PYTEST_ARGS...
step_sanitizer() {
  local tool=$1 log=$2 t=$SECONDS rc san n summary tests status
  shift 2
  section "$log" "$tool"
  if [[ $DRY == 1 ]] || ! san=$(find_sanitizer); then
    "$PY" -m pytest "$@" --collect-only -q -p no:cacheprovider >>"$log" 2>&1
    n=$(grep -oE '^[0-9]+(/[0-9]+)? tests? collected' "$log" | tail -n 1)
    record "$tool" "$([[ $DRY == 1 ]] && echo SKIP || echo FAIL)" $((SECONDS - t)) \
      "$([[ $DRY == 1 ]] && echo 'dry run' || echo 'no compute-sanitizer found'): selection has ${n:-no tests}"
    return 0
  fi
  local opts=(--tool "$tool" --error-exitcode 86 --print-limit 30)
  local envs=()
  if [[ $tool == memcheck ]]; then
    # torch's own probing calls are no kernel errors; the caching allocator would hide overruns
    # inside its pooled blocks.
    opts+=(--report-api-errors no)
    envs=(PYTORCH_NO_CUDA_MEMORY_CACHING=1)
  fi
  run_capped $PHASE_CAP 30 "$log" env ${envs[@]+"${envs[@]}"} "$san" "${opts[@]}" "$PY" -m pytest "$@" -q -p no:cacheprovider -rfE
  rc=$?
  summary=$(grep -E '(ERROR|RACECHECK) SUMMARY' "$log" | tail -n 1 | sed 's/^=* *//')
  local first
  first=$(grep -m 1 -E '^========= +(Invalid|Race|Error|Barrier|Uninitialized|Program hit|Malloc|Out-of-range)' "$log" \
          | sed 's/^=* *//' | cut -c1-200)
  tests=$(grep -E '[0-9]+ (passed|failed|error)' "$log" | tail -n 1 | sed 's/=//g; s/^ *//')
  status=$(status_of $rc)
  # Zero errors required; the summary line must be there and say so.
  if [[ $status == PASS ]] && ! [[ $summary =~ (ERROR\ SUMMARY:\ 0\ errors|RACECHECK\ SUMMARY:\ 0\ hazards|\(0\ errors) ]]; then
    status=FAIL
  fi
  ((rc == 86)) && status=FAIL
  record "$tool" "$status" $((SECONDS - t)) "${summary:-no sanitizer summary}; pytest: ${tests:-?}${first:+; first: $first}"
}

# ------------------------------------------------------------------------------------- benchmarks
smi() {
  command -v nvidia-smi >/dev/null 2>&1 || return 0
  nvidia-smi --query-gpu=clocks.sm,clocks.mem,temperature.gpu,power.draw,utilization.gpu,memory.used,clocks_throttle_reasons.active --format=csv >>"$1" 2>&1
}

# bench_step NAME CAP MIN RESULT(in benchmarks/results, or "") CMD...
bench_step() {
  local name=$1 cap=$2 min=$3 result=$4 log=$OUT/bench.log t=$SECONDS rc start
  shift 4
  section "$log" "$name"
  start=$(wc -l <"$log")
  SYMFAST_BENCH_SECONDS=$BENCH_SECONDS run_capped "$cap" "$min" "$log" "$@"
  rc=$?
  if ((rc == 0)) && [[ -n $result ]]; then
    if [[ $DRY == 1 ]]; then
      [[ -f $OUT/$result ]] || rc=1
    elif [[ -f benchmarks/results/$result ]]; then
      cp "benchmarks/results/$result" "$OUT/$result"
    else
      rc=1
    fi
  fi
  local note
  note="exit $rc (bench.log): $(tail -n +$((start + 1)) "$log" | grep -m 3 -E '^(FAILED|ERROR) |Error' | cut -c1-160 | tr '\n' '|')"
  ((rc == 0)) && note="${result:-ok}"
  ((rc == 124)) && note="ran out of its time (bench.log)"
  ((rc == 125)) && note="not run: too little of the budget left"
  record "$name" "$(status_of $rc)" $((SECONDS - t)) "$note"
}

step_bench_dcs() {
  if [[ $DRY == 1 ]]; then
    bench_step bench_dcs 150 20 "$SLUG.json" "$PY" benchmarks/report.py -k "cpu and 1M and fwdbwd and float32" --out "$OUT/$SLUG.json"
  else
    bench_step bench_dcs 150 40 "$SLUG.json" "$PY" benchmarks/report.py -k "cuda and (64M or 256M)"
  fi
}

step_bench_train() {
  if [[ $DRY == 1 ]]; then
    bench_step bench_train 120 20 "training_step-$SLUG.json" "$PY" benchmarks/test_training_step.py \
      -k "test_training_step and mlp and (plain or symfast-elementwise)" --out "$OUT/training_step-$SLUG.json"
  else
    bench_step bench_train 90 20 "training_step-$SLUG.json" "$PY" benchmarks/test_training_step.py -k test_training_step_cuda
  fi
}

step_bench_group() {
  if [[ $DRY == 1 ]]; then
    bench_step bench_group 90 20 "group-$SLUG.json" "$PY" benchmarks/report.py --bench group -k "cpu and dim0" \
      --out "$OUT/group-$SLUG.json"
  else
    bench_step bench_group 60 20 "group-$SLUG.json" "$PY" benchmarks/report.py --bench group -k cuda
  fi
}

step_bench_curv() {
  local k="cuda and not compiled"
  [[ $DRY == 1 ]] && k="mlp and K1 and not cuda and not compiled"
  bench_step bench_curv 75 20 "" "$PY" -m pytest benchmarks/test_bench_curvature.py -k "$k" -q -s -p no:cacheprovider \
    --benchmark-json="$OUT/curvature-$SLUG.json" --benchmark-columns=median,iqr,rounds
}

# ---------------------------------------------------------------------------------------- summary
write_summary() {
  "$PY" - "$STATE/steps.tsv" "$OUT" "${SLUG:-unknown}" "$BUDGET" "$(elapsed)" "$DRY" "$STEPS" <<'EOF' | tee "$OUT/summary.txt"
import json
import sys
from pathlib import Path

steps_file, out, slug, budget, total, dry, wanted = sys.argv[1:8]
out = Path(out)
rows = []
if Path(steps_file).exists():
    rows = [line.rstrip("\n").split("\t", 3) for line in open(steps_file) if line.strip()]
done = {r[0] for r in rows}
for name in wanted.split():
    if name not in done:
        rows.append([name, "NOTRUN", "0", "not reached: an earlier step failed"])
order = ["env"] + wanted.split()
rows.sort(key=lambda r: order.index(r[0]) if r[0] in order else len(order))
statuses = {r[1] for r in rows}
# PASS: every step wanted ran and passed (SKIP: a dry run's stand-in); INCOMPLETE: none failed, but
# some did not run or ran out of time.
if statuses & {"FAIL"}:
    overall = "FAIL"
elif statuses & {"TIMEOUT", "BUDGET", "NOTRUN"}:
    overall = "INCOMPLETE"
else:
    overall = "PASS"
lines = [f"== gpu_check summary: {slug}, {total} s of a {budget} s budget{' (DRY RUN, no GPU)' if dry == '1' else ''} =="]
lines.append(f"{'step':<12} {'status':<8} {'s':>4}  note")
for name, status, secs, note in rows:
    lines.append(f"{name:<12} {status:<8} {secs:>4}  {note}")


def load(name):
    p = out / name
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None


def numel(n):
    return f"{n >> 20}M" if n % (1 << 20) == 0 else str(n)


f = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
met = total_targets = 0
dcs = load(f"{slug}.json")
if dcs:
    lines.append("")
    lines.append("dcs (fused fwd+bwd unless noted): symfast ms | x eager | x compiled | GB/s | copy GB/s | % of copy")
    for r in dcs["rows"]:
        verdict = ""
        t = r.get("targets")
        if t:
            total_targets += 2
            met += bool(t["pct_of_copy_ok"]) + bool(t["vs_compiled_ok"])
            verdict = (f"  targets: {'PASS' if t['pct_of_copy_ok'] else 'FAIL'} >= {t['pct_of_copy_min']:.0f}% copy, "
                       f"{'PASS' if t['vs_compiled_ok'] else 'FAIL'} >= {t['vs_compiled_min']}x compiled")
        lines.append(f"  {r['case']:<18} {numel(r['numel']):>5} {r['dtype']:<8} {r['device']:<4} "
                     f"{f(r['symfast_ms'], '.3f'):>8} | {f(r['speedup_vs_eager'], '.2f'):>5} | "
                     f"{f(r['speedup_vs_compiled'], '.2f'):>5} | {f(r['symfast_gbps'], '.0f'):>5} | "
                     f"{f(r['copy_gbps'], '.0f'):>5} | {f(r['pct_of_copy'], '.0f'):>3}{verdict}")
group = load(f"group-{slug}.json")
if group:
    lines.append("")
    lines.append("dcs_group fwd+bwd: symfast ms | x eager | x compiled | GB/s | % of copy")
    for r in group["rows"]:
        lines.append(f"  {r['case']:<22} {r['dtype']:<8} {r['device']:<4} {f(r['symfast_ms'], '.3f'):>8} | "
                     f"{f(r['speedup_vs_eager'], '.2f'):>5} | {f(r['speedup_vs_compiled'], '.2f'):>5} | "
                     f"{f(r['symfast_gbps'], '.0f'):>5} | {f(r['pct_of_copy'], '.0f'):>3}")
train = load(f"training_step-{slug}.json")
if train:
    lines.append("")
    lines.append("training step (batch 128): median ms (vs plain) | peak MiB above live (vs plain) | max allocated MiB")
    rows_t = [r for r in train["rows"] if r.get("impl") not in ("paired", "phases")]  # per-model rows only
    base = {r["model"]: r for r in rows_t if r.get("impl") == "plain"}
    for r in rows_t:
        b = base.get(r["model"])
        vs = lambda k: f" ({r[k] / b[k]:.2f}x)" if b and b.get(k) else ""  # noqa: E731
        absolute = r.get("cuda_max_memory_allocated")
        lines.append(f"  {r['model']:<9} {r.get('device', 'cpu'):<4} {r['impl'] + '-' + r['structure']:<22} "
                     f"{r['median_s'] * 1e3:8.2f}{vs('median_s'):<9} {r['peak_bytes'] / 2**20:9.1f}{vs('peak_bytes'):<9} "
                     f"{'-' if absolute is None else format(absolute / 2**20, '.0f')}")
curv = load(f"curvature-{slug}.json")
if curv:
    lines.append("")
    lines.append("per-sample curvature (symfast): cost vs fwdbwd (interleaved) | speed-up vs vmap (interleaved)")
    for b in curv.get("benchmarks", []):
        x = b.get("extra_info", {})
        if x.get("impl") == "symfast":
            lines.append(f"  {x['case']:<34} {x.get('device', 'cpu'):<4} {x.get('interleaved_cost_vs_fwdbwd', '-')} x | "
                         f"{x.get('interleaved_speedup_vs_vmap', '-')} x")
lines.append("")
if total_targets:
    lines.append(f"GPU targets met: {met} of {total_targets} (>= 80% of copy bandwidth, >= 1.1x torch.compile; "
                 "masked fwd+bwd at 64M and 256M)")
lines.append(f"overall: {overall} (steps; targets reported above, not part of it)")
print("\n".join(lines))
EOF
}

# ------------------------------------------------------------------------------------------- main
: >"$STATE/steps.tsv"
say "OUT=$OUT dry=$DRY budget=${BUDGET}s steps:$STEPS"
SLUG=""
ok=1
step_env || ok=0
if ((ok)) && want build; then
  step_build || ok=0
fi
if ((ok)); then
  pids=()
  if want tests; then step_tests & pids+=($!); fi
  if want memcheck; then
    step_sanitizer memcheck "$STATE/memcheck.log" tests/ops/test_dcs.py tests/ops/test_dcs_group.py -k "$MEMCHECK_K" &
    pids+=($!)
  fi
  if want racecheck; then
    step_sanitizer racecheck "$STATE/racecheck.log" tests/ops/test_dcs_group.py -k "$RACECHECK_K" &
    pids+=($!)
  fi
  for p in "${pids[@]}"; do wait "$p"; done
  for f in memcheck racecheck; do [[ -f $STATE/$f.log ]] && cat "$STATE/$f.log" >>"$OUT/tests.log"; done
  if want bench_dcs || want bench_train || want bench_group || want bench_curv; then
    section "$OUT/bench.log" "nvidia-smi before the benchmarks"
    smi "$OUT/bench.log"
    want bench_dcs && step_bench_dcs
    want bench_train && step_bench_train
    want bench_group && step_bench_group
    want bench_curv && step_bench_curv
    section "$OUT/bench.log" "nvidia-smi after the benchmarks"
    smi "$OUT/bench.log"
  fi
fi
write_summary
grep -q '^overall: PASS' "$OUT/summary.txt"
