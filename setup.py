"""Build script for symfast's compiled extension, ``symfast._C``.

Metadata and dependencies live in pyproject.toml; this file only describes the
extension, because that needs the installed torch (see pyproject.toml for why
builds use ``--no-build-isolation``).

Build switches (environment variables):

``SYMFAST_CUDA``
    ``auto`` (default): build ``csrc/cuda/*.cu`` when ``CUDA_HOME`` is found and
    the installed torch is a CUDA build (``torch.version.cuda``). No GPU is
    needed to compile. ``1``: require the CUDA build and fail if it is not
    possible. ``0``: CPU only.
``TORCH_CUDA_ARCH_LIST``
    GPU architectures to compile for, e.g. ``"8.0;9.0"`` (read by
    torch.utils.cpp_extension). Without it, torch's default list for the
    installed CUDA is used when no GPU is visible.
``SYMFAST_DEBUG=1``
    ``-O0 -g`` with assertions and ``-lineinfo`` for CUDA, for gdb and
    compute-sanitizer.
``SYMFAST_SANITIZE=address,undefined``
    Instrument the C++ sources with AddressSanitizer and/or
    UndefinedBehaviorSanitizer (a comma-separated subset of ``address`` and
    ``undefined``; GCC or Clang). Python itself is not instrumented, so the
    ASan runtime must be loaded first:
    ``LD_PRELOAD=$(gcc -print-file-name=libasan.so) ASAN_OPTIONS=detect_leaks=0``
    (CPython's allocations at exit would all be reported as leaks);
    ``UBSAN_OPTIONS=halt_on_error=1`` makes undefined behaviour fail the run.
    ``.ci/sanitize.sh`` builds this way in a scratch copy and runs the op tests.
    CUDA device code is not instrumented (use compute-sanitizer there).
``MAX_JOBS``
    Parallel compile jobs (read by torch.utils.cpp_extension with ninja).
"""

import glob
import os
import sys

from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

import torch

ROOT = os.path.dirname(os.path.abspath(__file__))


def _cuda_requested() -> bool:
    mode = os.environ.get("SYMFAST_CUDA", "auto").strip().lower()
    possible = CUDA_HOME is not None and torch.version.cuda is not None
    if mode in ("0", "false", "no", "off"):
        return False
    if mode in ("1", "true", "yes", "on"):
        if not possible:
            sys.exit(
                "SYMFAST_CUDA=1 but CUDA cannot be built: "
                f"CUDA_HOME={CUDA_HOME!r}, torch.version.cuda={torch.version.cuda!r} "
                "(install a CUDA build of torch and set CUDA_HOME to the toolkit folder)"
            )
        return True
    if mode != "auto":
        sys.exit(f"SYMFAST_CUDA must be auto, 0 or 1, got {mode!r}")
    return possible


SANITIZERS = ("address", "undefined")


def _sanitizers() -> list:
    value = os.environ.get("SYMFAST_SANITIZE", "").strip().lower()
    names = [n.strip() for n in value.split(",") if n.strip()]
    unknown = [n for n in names if n not in SANITIZERS]
    if unknown:
        sys.exit(
            f"SYMFAST_SANITIZE must be a comma-separated subset of {', '.join(SANITIZERS)}, "
            f"got {value!r}"
        )
    return sorted(set(names), key=SANITIZERS.index)


def get_extensions():
    debug = os.environ.get("SYMFAST_DEBUG", "0") == "1"
    use_cuda = _cuda_requested()
    sanitize = _sanitizers()
    opt = ["-O0", "-g"] if debug else ["-O3", "-DNDEBUG"]
    # -fopenmp: at::parallel_for is an inline OpenMP region; without the flag
    # it silently runs on one thread.
    # No -std flag: torch.utils.cpp_extension adds the standard the installed
    # torch needs (C++17 up to 2.13, C++20 from 2.14).
    # -ffp-contract=off: never fuse a*b + c into one rounding (an FMA), so every
    # instruction set of csrc/cpu/isa.h rounds like the baseline and like PyTorch.
    cxx = opt + ["-fopenmp", "-ffp-contract=off", "-fdiagnostics-color=always"]
    link = ["-fopenmp"]
    if sanitize:
        # Frame pointers and line tables (-g1) so that reports show where in csrc/ they happened.
        # -O1, as the sanitizers' own documentation advises: reports stay exact, and the
        # instrumented build, which only CI runs, compiles faster than at -O3.
        flags = [f"-fsanitize={','.join(sanitize)}", "-fno-omit-frame-pointer", "-g1", "-O1"]
        cxx += flags
        link += flags
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    sources += sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    kwargs = dict(extra_compile_args={"cxx": cxx}, extra_link_args=link)
    if use_cuda:
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        # No --use_fast_math: it flushes float32 denormals to zero, and the
        # kernels must match the CPU ones bit for bit.
        nvcc = ["-O3"] if not debug else ["-O0", "-g", "-lineinfo"]
        nvcc += ["--expt-relaxed-constexpr"]
        kwargs["extra_compile_args"]["nvcc"] = nvcc
        ext = CUDAExtension
    else:
        ext = CppExtension
    print(f"symfast: building {'CPU + CUDA' if use_cuda else 'CPU-only'} extension"
          + (f" with -fsanitize={','.join(sanitize)}" if sanitize else ""), file=sys.stderr)
    return [ext("symfast._C", sources, **kwargs)]


setup(
    ext_modules=get_extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(no_python_abi_suffix=False)},
)
