# Two commands do all the set-up on a fresh machine:
#   make demo   the whole job on built-in synthetic sample data
#   make test   the test suite
# Both create .venv at the repo root on first use.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# Which DALI build to install: cuda120 (CUDA 12 drivers, the default) or cuda130.
DALI   ?= cuda120
# torch 2.13.0 installs a CPU build from local wheels where they exist; on a GPU
# machine set TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126".
TORCH  ?= torch==2.13.0
# pillow-simd's SIMD paths need the compiler flag; AVX2 only where the CPU has it.
SIMD_CC := cc $(shell grep -q avx2 /proc/cpuinfo 2>/dev/null && echo -mavx2)
STAMP  := $(VENV)/.installed

.PHONY: test test-fast demo bench clean-demo

$(STAMP): pyproject.toml setup.py tools/_rgbsums.c Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first, so nothing below pulls a different (multi-GB CUDA) build.
	$(PIP) install -q $(TORCH)
	CC="$(SIMD_CC)" $(PIP) install -q -e '.[dali-$(DALI),dev]'
	# matplotlib pulled in stock Pillow, which overwrites pillow-simd's PIL:
	# remove both, then reinstall pillow-simd alone (pip's wheel cache keeps its build).
	$(PIP) uninstall -q -y pillow pillow-simd
	CC="$(SIMD_CC)" $(PIP) install -q --no-deps --no-binary pillow-simd pillow-simd
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests

demo: $(STAMP)
	$(PY) -m tools.dev.demo

bench: $(STAMP)
	$(PY) -m tools.dev.bench all

clean-demo:
	rm -rf demo shards/sample
