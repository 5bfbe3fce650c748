#!/usr/bin/env bash
# CUDA build check for symfast: compile csrc/cuda/*.cu against a CUDA build of
# torch, import the result, and check that every op has a CUDA kernel.
#
# CI runs this where nvcc is present. No GPU is needed: it proves the CUDA
# sources compile, link and register. (Where a GPU is visible it also runs a
# short numerical smoke test against symfast.reference.)
#
# Usage: .ci/cuda_build_check.sh [--prepare] [REPO_ROOT]
#   --prepare                 only create the virtualenv and install the build requirements
#                             (with SYMFAST_CUDA_VENV, so that a later run reuses them: .ci/run
#                             does this in the background while the tests run)
#   REPO_ROOT                 default: the repository that holds this script
# Environment:
#   CUDA_HOME                 toolkit folder; default: found from `nvcc` on PATH
#   SYMFAST_CUDA_VENV         reuse (or create) the virtualenv at this path
#                             instead of a fresh one in a temp dir
#   TORCH_SPEC                default: torch==2.14.1
#   TORCH_CUDA_ARCH_LIST      default: 9.0
#   PYTHON                    interpreter that creates the venv; default: python3
#   SYMFAST_KEEP_TMP=1        keep the temp dir (build tree and log) for debugging
#
# The repository is built in a temporary copy and installed with `pip install
# --target` into that temp dir, so neither the checkout nor a reused venv is
# modified (an editable install would leave the venv pointing at a deleted
# copy).
set -euo pipefail

log() { printf '[cuda-build-check] %s\n' "$*"; }
die() { printf '[cuda-build-check] ERROR: %s\n' "$*" >&2; exit 1; }

prepare_only=0
if [[ ${1:-} == --prepare ]]; then
  prepare_only=1
  shift
fi
script_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=${1:-$(cd "$script_dir/.." && pwd)}
[[ -f $repo/setup.py && -d $repo/csrc ]] || die "$repo is not the symfast repository (no setup.py/csrc)"
repo=$(cd "$repo" && pwd)
compgen -G "$repo/csrc/cuda/*.cu" >/dev/null || die "no CUDA sources in $repo/csrc/cuda"

# ------------------------------------------------------------ CUDA toolkit
source "$script_dir/nvcc.sh"  # resolve_nvcc

if [[ -n ${CUDA_HOME:-} ]]; then
  log "CUDA_HOME given: $CUDA_HOME"
else
  nvcc_on_path=$(command -v nvcc) || die "nvcc is not on PATH; install the CUDA toolkit or set CUDA_HOME"
  nvcc_real=$(resolve_nvcc "$nvcc_on_path")
  [[ $nvcc_real != "$(readlink -f "$nvcc_on_path")" ]] && log "nvcc on PATH ($nvcc_on_path) runs $nvcc_real"
  CUDA_HOME=$(dirname "$(dirname "$nvcc_real")")
  log "CUDA_HOME (from nvcc): $CUDA_HOME"
fi
[[ -x $CUDA_HOME/bin/nvcc ]] || die "$CUDA_HOME/bin/nvcc does not exist: set CUDA_HOME to the toolkit folder"
[[ -f $CUDA_HOME/include/cuda_runtime_api.h ]] || die "$CUDA_HOME/include/cuda_runtime_api.h missing: not a CUDA toolkit folder"
export CUDA_HOME
log "nvcc: $("$CUDA_HOME/bin/nvcc" --version | grep -E 'release' || echo unknown)"

# ---------------------------------------------------------------- workspace
tmp=$(mktemp -d "${TMPDIR:-/tmp}/symfast-cuda-check.XXXXXX")
cleanup() {
  if [[ ${SYMFAST_KEEP_TMP:-0} == 1 ]]; then log "kept $tmp"; else rm -rf "$tmp"; fi
}
trap cleanup EXIT

# --------------------------------------------------------------- virtualenv
python=${PYTHON:-python3}
if [[ -n ${SYMFAST_CUDA_VENV:-} ]]; then
  venv=$SYMFAST_CUDA_VENV
  if [[ -x $venv/bin/python ]]; then
    log "reusing virtualenv $venv"
  else
    log "creating virtualenv $venv"
    "$python" -m venv "$venv"
  fi
else
  venv=$tmp/venv
  log "creating fresh virtualenv $venv"
  "$python" -m venv "$venv"
fi
torch_spec=${TORCH_SPEC:-torch==2.14.1}
log "pip install $torch_spec numpy setuptools wheel ninja"
start=$SECONDS
"$venv/bin/python" -m pip install --quiet "$torch_spec" numpy setuptools wheel ninja \
  || die "pip install of the build requirements failed"
log "requirements ready in $((SECONDS - start)) s"
"$venv/bin/python" - <<'EOF' || die "the installed torch cannot build CUDA extensions"
import torch
print(f"[cuda-build-check] torch {torch.__version__}, built with CUDA {torch.version.cuda}")
if torch.version.cuda is None:
    raise SystemExit("[cuda-build-check] this torch is a CPU-only build")
EOF
if ((prepare_only)); then
  [[ -n ${SYMFAST_CUDA_VENV:-} ]] || die "--prepare needs SYMFAST_CUDA_VENV (a fresh venv in a temp dir would be deleted)"
  log "OK: $venv is ready"
  exit 0
fi

# -------------------------------------------------------------------- build
# Copy the sources without build products of the checkout (a stale _C*.so in
# the copy would be imported instead of the fresh one).
src=$tmp/src
mkdir -p "$src"
tar -C "$repo" \
  --exclude=./.git --exclude=./build --exclude='*.egg-info' --exclude='./symfast/_C*.so' \
  --exclude='__pycache__' --exclude='./.venv*' -cf - . | tar -C "$src" -xf -

export SYMFAST_CUDA=1 MAX_JOBS=2
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
site=$tmp/site
build_log=$tmp/build.log
log "building symfast (SYMFAST_CUDA=1, TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST, MAX_JOBS=$MAX_JOBS); log: $build_log"
start=$SECONDS
if ! (cd "$src" && "$venv/bin/python" -m pip install -v --no-build-isolation --no-deps \
      --target "$site" .) >"$build_log" 2>&1; then
  tail -n 150 "$build_log" >&2
  # The first errors explain the rest, and are often far above the tail.
  printf '[cuda-build-check] first errors in the log:\n' >&2
  grep -m 15 -E '(error:|#error|error #)' "$build_log" >&2 || true
  die "build failed after $((SECONDS - start)) s (log tail and first errors above)"
fi
log "built in $((SECONDS - start)) s"
grep -q 'building CPU + CUDA extension' "$build_log" || die "setup.py did not build the CUDA extension"
# Compiler warnings, each distinct one once. A warning located in a torch
# header can still be ours: the log's "In function"/"note:" lines around it
# name the csrc/ file that instantiated it.
warning_re='(:[0-9]+(:[0-9]+)?: warning:|\([0-9]+\): warning)'
n_warnings=$(grep -cE "$warning_re" "$build_log" || true)
if ((n_warnings > 0)); then
  log "$n_warnings compiler warnings; distinct ones (full log: $build_log, kept with SYMFAST_KEEP_TMP=1):"
  grep -E "$warning_re" "$build_log" | sed -E 's/^[[:space:]]+//' | sort | uniq -c | sort -rn | head -n 20 || true
  grep -oE '(^|[[:space:]/])csrc/[^:[:space:]]+:[0-9]+' "$build_log" | sed -E 's/^[[:space:]/]+//' \
    | sort -u | head -n 20 | sed 's/^/[cuda-build-check]   involved: /' || true
else
  log "no compiler warnings"
fi

# ------------------------------------------------------------------- import
log "importing the build and checking kernel registrations"
(cd "$tmp" && PYTHONPATH="$site" "$venv/bin/python" - "$site") <<'EOF'
import os
import sys

import torch

import symfast

site = os.path.realpath(sys.argv[1])
here = os.path.realpath(symfast.__file__)
if not here.startswith(site + os.sep):
    raise SystemExit(f"[cuda-build-check] imported symfast from {here}, not from the fresh build in {site}")

missing = []
for op in ("dcs", "dcs_backward", "dcs_jvp", "dcs_group", "dcs_group_backward", "dcs_group_jvp",
           "jet_activation", "jet_dcs", "jet_dcs_group", "jet_layer_norm", "jet_rms_norm", "jet_softmax",
           "jet_cross_entropy"):
    for key in ("CPU", "CUDA"):
        ok = torch._C._dispatch_has_kernel_for_dispatch_key(f"symfast::{op}", key)
        print(f"[cuda-build-check]   symfast::{op:<20} {key:<4} kernel: {'yes' if ok else 'MISSING'}")
        if not ok:
            missing.append(f"{op}/{key}")
if missing:
    raise SystemExit(f"[cuda-build-check] kernels not registered: {', '.join(missing)}")

if torch.cuda.is_available():
    # Smoke test only (the test suite does the real checks): every op, with and
    # without a mask, equals the pure-PyTorch reference exactly.
    from symfast import reference

    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        w, u, v, grad, wd, ud, vd = (
            torch.randn(1027, 33, device=dev, generator=g).to(dtype) for _ in range(7))
        mask = torch.rand(1027, 33, device=dev, generator=g) < 0.5
        pairs = [
            (torch.ops.symfast.dcs(w, u, v, mask), reference.dcs(w, u, v, mask)),
            (torch.ops.symfast.dcs(w, u), reference.dcs(w, u)),
            (torch.ops.symfast.dcs_jvp(w, u, mask, wd, ud, vd), reference.dcs_jvp(w, u, mask, wd, ud, vd)),
        ]
        got = torch.ops.symfast.dcs_backward(grad, w, u, mask, True, True, True)
        pairs += zip(got, reference.dcs_backward(grad, w, u, mask, True, True, True))
        for a, b in pairs:
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.cuda.synchronize()
    print(f"[cuda-build-check] GPU smoke test passed on {torch.cuda.get_device_name()}")
else:
    print("[cuda-build-check] no GPU visible: numerical smoke test skipped")
EOF
log "OK: symfast builds with CUDA and registers CPU and CUDA kernels for every op"
