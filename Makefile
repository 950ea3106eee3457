SHELL := /bin/bash
# Quick start on a fresh machine (Python 3.11): `make demo`, `make test`.
PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
export MAX_JOBS ?= 2
# The C++ build is serialised (several shells may call `make build` at once during development).
LOCK := flock $(CURDIR)/.build.lock

.PHONY: venv build build-python test test-cpu test-triton demo bench clean

venv: $(VENV)/.deps-stamp

$(VENV)/.deps-stamp: requirements-dev.txt
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install --upgrade pip
	$(VPY) -m pip install -r requirements-dev.txt
	touch $@

# Editable install of the Python package (once), then the C++ extension built in place with ninja
# (incremental: objects are kept in build/). Full log in build.log.
build: venv
	$(LOCK) bash -c 'set -o pipefail; \
	  { test -f $(VENV)/.editable-stamp || { IMBREG_SKIP_EXT=1 $(VPY) -m pip install --no-build-isolation --no-deps -e . && touch $(VENV)/.editable-stamp; }; } > build.log 2>&1 && \
	  $(VPY) setup.py build_ext --inplace >> build.log 2>&1' \
	  || { tail -50 build.log; echo "build failed: see build.log"; exit 1; }
	@grep -A8 "imbreg_fast build configuration" build.log | head -9

# Pure-Python install (PyTorch backend only).
build-python: venv
	IMBREG_SKIP_EXT=1 $(VPY) -m pip install --no-build-isolation --no-deps -e .

test: build
	$(MAKE) --no-print-directory test-cpu test-triton

# Tests run in parallel worker processes (pytest-xdist): TEST_WORKERS=0 runs them in this process.
TEST_WORKERS ?= auto
PYTEST := $(VPY) -m pytest -n $(TEST_WORKERS)

test-cpu:
	$(PYTEST) tests -m "not requires_triton and not slow" -q

# Triton kernels run on the CPU under the interpreter (TRITON_INTERPRET must be set before `import triton`).
test-triton:
	TRITON_INTERPRET=1 $(PYTEST) tests -m "requires_triton and not slow" -q; rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "no Triton tests collected"; rc=0; fi; exit $$rc

# The quick tour: `benchmark synthetic --quick`, then `train depth --quick` (artefacts in imbreg_fast_out/).
demo: build
	$(VPY) -m imbreg_fast demo

bench: build
	$(VPY) -m pytest bench --benchmark-only -q

clean:
	rm -rf build *.egg-info imbreg_fast/*.so .benchmarks
