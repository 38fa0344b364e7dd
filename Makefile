# embedpipe: `make demo` and `make test` are all a fresh clone needs.
# Both create .venv and install the project (pinned by constraints.txt) when it is missing or stale.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.embedpipe-installed

# Engines stay on this machine: Prefect's ephemeral server, Ray and Dask on loopback, no telemetry.
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 180
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export DO_NOT_TRACK ?= 1
export RAY_USAGE_STATS_ENABLED ?= 0
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER ?= 0

.PHONY: setup demo test lint docs bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test]'
	@touch $(STAMP)

demo: setup
	$(VENV)/bin/embedpipe demo --out runs/demo

test: setup
	$(PY) -m pytest

lint: setup
	$(VENV)/bin/ruff check flows workers storage tests

docs: setup
	$(VENV)/bin/embedpipe config docs --out docs/configuration.md

bench: setup
	$(VENV)/bin/embedpipe bench extract --json runs/bench/extract.json

clean:
	rm -rf runs .pytest_cache
