# One entry point per job; each target sets up what it needs first (idempotent).
#   make demo    local multi-node cluster, real training job, failures injected, recovery shown
#   make test    the test suite (what CI runs)
#   make bench   the benchmark suite, regenerates docs/benchmarks.md

PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.installed
SUDO    = $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup demo test test-quick bench faults lint clean

setup: $(STAMP)

# promtool (Debian's prometheus package) checks the alert rules and runs the scrape test; the
# tests that need it skip with a message where it cannot be installed. The CPU build of torch
# is pinned: a bare "torch" would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml client/pyproject.toml
	@echo "setup: creating $(VENV) (torch CPU build, both packages editable, test tools)"
	@command -v promtool >/dev/null || { $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends \
	  prometheus >/dev/null; } || echo "setup: promtool not installed; its checks will skip"
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install --quiet --upgrade pip
	@$(PY) -m pip install --quiet torch==2.13.0
	@# setuptools' generic notice on every editable install ("be careful with folders named like
	@# the package") is silenced: it is about this very layout and says nothing new.
	@PYTHONWARNINGS=ignore $(PY) -m pip install --quiet -e '.[test,fallback,demo]' -e './client[hf,lightning]'
	@touch $@
	@echo "setup: done"

demo: $(STAMP)
	$(VENV)/bin/snapshotd demo

test: $(STAMP)
	$(PY) -m pytest -q tests

bench: $(STAMP)
	$(PY) -m bench all --full

faults: $(STAMP)
	SNAPSHOTD_FAULT_RUNS=long $(PY) -m pytest -q tests/faults tests/integration/test_torchrun_sharded.py \
	  tests/integration/test_torchrun.py tests/integration/test_bench_smoke.py

lint: $(STAMP)
	$(PY) -m ruff check snapshotd client tests bench
	$(PY) -m mypy snapshotd client/snapshotd_client

clean:
	rm -rf $(VENV) build *.egg-info client/*.egg-info .pytest_cache
