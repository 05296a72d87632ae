# One entry point per job; each target sets up what it needs first (idempotent).
#   make demo    local multi-node cluster, real training job, failures injected, recovery shown
#   make test    the test suite (what CI runs)
#   make bench   the benchmark suite, regenerates docs/benchmarks.md

PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.installed

.PHONY: setup demo test test-quick bench faults lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml client/pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# The CPU build of torch, pinned: a bare "torch" would pull a multi-GB CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test,fallback,demo]' -e ./client
	touch $@

demo: $(STAMP)
	$(VENV)/bin/snapshotd demo

test: $(STAMP)
	$(PY) -m pytest -q tests

bench: $(STAMP)
	$(PY) -m bench all

faults: $(STAMP)
	SNAPSHOTD_FAULT_RUNS=long $(PY) -m pytest -q tests/faults

lint: $(STAMP)
	$(PY) -m ruff check snapshotd client tests bench
	$(PY) -m mypy snapshotd client/snapshotd_client

clean:
	rm -rf $(VENV) build *.egg-info client/*.egg-info .pytest_cache
