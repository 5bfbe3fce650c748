#!/usr/bin/env bash
# CI: the CPU extension built with AddressSanitizer and UndefinedBehaviorSanitizer
# (SYMFAST_SANITIZE=address,undefined, see setup.py), and the op, group-op and
# output-cache tests run against it. Any report fails the run.
#
# The build happens in a scratch copy of the repository, so the checkout's own
# build (used by the rest of CI) is never replaced by the instrumented one.
#
# Usage: .ci/sanitize.sh [PYTEST_ARGS...]   (default: the three test files)
# Environment:
#   PYTHON            interpreter with torch and the test dependencies;
#                     default: the repository's .venv (made by `make test`),
#                     else python3
#   MAX_JOBS          parallel compile jobs (default 2)
#   SYMFAST_KEEP_TMP=1  keep the scratch copy (build and logs) for debugging
set -euo pipefail

log() { printf '[sanitize] %s\n' "$*"; }
die() { printf '[sanitize] ERROR: %s\n' "$*" >&2; exit 1; }

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [[ -n ${PYTHON:-} ]]; then
  python=$PYTHON
elif [[ -x $repo/.venv/bin/python ]]; then
  python=$repo/.venv/bin/python
else
  python=python3
fi
tests=("$@")
((${#tests[@]})) || tests=(tests/ops/test_dcs.py tests/ops/test_dcs_group.py tests/ops/test_cpu_cache.py tests/ops/test_jet_pointwise.py
                         tests/ops/test_jet_rows.py)

# The Python interpreter is not instrumented, so the ASan runtime must be loaded
# before anything else (the UBSan runtime comes in as a dependency of the
# extension). It must be the runtime of the compiler that builds the extension
# (c++, normally GCC). libstdc++ is preloaded with it: python does not link it,
# and ASan's __cxa_throw interceptor finds the real function only if libstdc++
# is loaded when ASan starts (otherwise the first C++ exception, such as a
# TORCH_CHECK error, aborts with "CHECK failed ... real___cxa_throw").
cxx=${CXX:-c++}
libasan=$("$cxx" -print-file-name=libasan.so)
[[ -f $libasan ]] || die "$cxx has no libasan.so ($libasan): install the compiler's sanitizer runtime (libasan)"
libstdcxx=$(readlink -f "$("$cxx" -print-file-name=libstdc++.so.6)")
[[ -f $libstdcxx ]] || die "$cxx has no libstdc++.so.6 ($libstdcxx)"

tmp=$(mktemp -d "${TMPDIR:-/tmp}/symfast-sanitize.XXXXXX")
cleanup() {
  if [[ ${SYMFAST_KEEP_TMP:-0} == 1 ]]; then log "kept $tmp"; else rm -rf "$tmp"; fi
}
trap cleanup EXIT

# The sources without the checkout's build products: a stale _C*.so in the copy
# would be imported instead of the instrumented one.
src=$tmp/src
mkdir -p "$src"
tar -C "$repo" \
  --exclude=./.git --exclude=./build --exclude='*.egg-info' --exclude='./symfast/_C*.so' \
  --exclude='__pycache__' --exclude='./.venv*' --exclude='./gpu_out' -cf - . | tar -C "$src" -xf -

log "building with SYMFAST_SANITIZE=address,undefined (CPU only) in $src"
start=$SECONDS
if ! (cd "$src" && SYMFAST_SANITIZE=address,undefined SYMFAST_CUDA=0 MAX_JOBS=${MAX_JOBS:-2} \
      "$python" setup.py build_ext --inplace) >"$tmp/build.log" 2>&1; then
  tail -n 60 "$tmp/build.log" >&2
  die "build failed after $((SECONDS - start)) s"
fi
log "built in $((SECONDS - start)) s"
so=$(ls "$src"/symfast/_C*.so 2>/dev/null | head -n 1)
[[ -n $so ]] || die "the build made no symfast/_C*.so"
ldd "$so" | grep -q libasan || die "$so is not linked with libasan: SYMFAST_SANITIZE had no effect"

# detect_leaks=0: CPython and torch keep allocations alive until exit on
# purpose, and LeakSanitizer would report all of them. halt_on_error: the
# first report ends the process with a failure, so pytest cannot pass over it.
# log_path: reports go to files, because pytest captures the stderr of a test
# (and a report from a subprocess a test starts would not reach this log); any
# report file fails the run, whatever the exit status.
reports=$tmp/reports
mkdir -p "$reports"
export LD_PRELOAD="$libasan $libstdcxx${LD_PRELOAD:+ $LD_PRELOAD}"
export ASAN_OPTIONS=detect_leaks=0:halt_on_error=1:exitcode=86:log_path=$reports/asan
export UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1:exitcode=87:log_path=$reports/ubsan
export PYTHONPATH=$src${PYTHONPATH:+:$PYTHONPATH}

(cd "$src" && "$python" - "$src") <<'PY' || die "the instrumented build is not the one imported"
import os
import sys

import symfast._C as ext

src = os.path.realpath(sys.argv[1])
here = os.path.realpath(ext.__file__)
if not here.startswith(src + os.sep):
    raise SystemExit(f"[sanitize] imported {here}, not the instrumented build in {src}")
print(f"[sanitize] testing {here}")
PY

log "pytest ${tests[*]}"
start=$SECONDS
rc=0
# One pytest-xdist worker per core (at most 2): a report from any worker still lands in $reports.
(cd "$src" && "$python" -m pytest -q -p no:cacheprovider -n auto --maxprocesses 2 "${tests[@]}") || rc=$?
log "tests finished in $((SECONDS - start)) s with exit status $rc"
if compgen -G "$reports/*" >/dev/null; then
  for f in "$reports"/*; do
    log "report $(basename "$f"):"
    head -n 80 "$f"
  done
  die "sanitizer reports (above)"
fi
case $rc in
  0) log "OK: no AddressSanitizer or UndefinedBehaviorSanitizer report" ;;
  86) die "AddressSanitizer reported an error (above)" ;;
  87) die "UndefinedBehaviorSanitizer reported an error (above)" ;;
  *) die "the tests failed (exit status $rc)" ;;
esac
