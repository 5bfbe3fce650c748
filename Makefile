# Set-up and the two Quickstart targets. Each target creates the virtualenv,
# installs torch and builds symfast on first use, so a fresh clone needs only
# Python >= 3.10 and a C++ compiler:
#
#   make demo    the main job (paper Figure 1-left demo)
#   make test    the test suite
#
# Variables: PYTHON (interpreter for the venv), VENV (its folder), TORCH_SPEC
# (the torch to install; the CPU build 2.13.0 by default, any torch >= 2.4
# works), and the build switches of setup.py (SYMFAST_CUDA, SYMFAST_DEBUG,
# TORCH_CUDA_ARCH_LIST, MAX_JOBS) pass through the environment.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.symfast-built
SOURCES := setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*.cpp csrc/cpu/*.h csrc/cuda/*.cu csrc/cuda/*.cuh)

.PHONY: demo test bench repro-full install clean

demo: $(STAMP)
	$(PY) -m symfast demo

# One test worker per core (pytest-xdist), at most TEST_WORKERS_MAX: each worker imports torch and
# transformers, so memory, not cores, bounds a big machine.
TEST_WORKERS_MAX ?= 8

test: $(STAMP)
	$(PY) -m pytest -q -n auto --maxprocesses $(TEST_WORKERS_MAX)

repro-full: $(STAMP)
	$(PY) -m symfast repro --all --full

bench: $(STAMP)
	$(PY) benchmarks/report.py

install: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch is installed before the build and symfast is built without build
# isolation, against that torch (see pyproject.toml for why).
$(STAMP): $(PY) $(SOURCES)
	$(PY) -m pip install --quiet "setuptools>=64" wheel ninja "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet --no-build-isolation -e ".[test,bench]"
	touch $(STAMP)

clean:
	rm -rf build *.egg-info symfast/*.so $(VENV)
