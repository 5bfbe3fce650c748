#!/usr/bin/env bash
# Shared by .ci/cuda_build_check.sh and benchmarks/gpu_check.sh (sourced).
#
# `nvcc` on PATH may be a symlink, or a wrapper script such as
#   #!/bin/sh
#   exec /usr/local/cuda-13.0/bin/nvcc "$@"
# in which case torch would take the wrapper's folder for CUDA_HOME and not find
# the headers and libraries. Follow symlinks and `exec .../nvcc` lines to the
# real binary; its grandparent folder is the toolkit.
resolve_nvcc() {
  local path target hops=0
  path=$(readlink -f "$1")
  while ((hops++ < 8)) && [[ $(head -c 2 "$path") == '#!' ]]; do
    target=$(sed -nE 's/^[[:space:]]*exec[[:space:]]+["'\'']?([^"'\''[:space:]]*nvcc)["'\'']?([[:space:]].*)?$/\1/p' "$path" | head -n 1)
    [[ -n $target && -x $target ]] || break
    path=$(readlink -f "$target")
  done
  printf '%s\n' "$path"
}
