# Two commands on a fresh clone: `make demo` (index the bundled sample, search it) and `make test`.
# Each creates .venv on first use: torch pinned first (a small CPU wheel here; an unpinned torch
# pulls a multi-GB CUDA build), then the locked stack and batchrank itself.
PY ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.batchrank-installed
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: demo test setup clean

setup: $(STAMP)

$(STAMP): pyproject.toml requirements-lock.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -r requirements-lock.txt -e ".[dev]"
	touch $@

demo: $(STAMP)
	$(BIN)/python examples/demo.py --config configs/demo.yaml

test: $(STAMP)
	$(BIN)/python -m pytest tests -n 2 --dist loadfile

clean:
	rm -rf .batchrank .pytest_cache ~/.batchrank/demo-lancedb ~/.batchrank/bad-rows-lancedb
