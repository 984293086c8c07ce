# lumbar-node: two commands for a newcomer, `make run` and `make test`.
# Everything else here is plumbing those two use.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CONFIG ?= config/node.toml
# A GPU host installs its CUDA torch build into .venv before `make run` (see README).
TORCH_SPEC ?= torch==2.13.0

.PHONY: run test setup test-peers lint typecheck unit integration bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

## Start the node with the default configuration (local spool + SQLite).
run: setup
	$(BIN)/lumbar-node serve --config $(CONFIG)

## Install the real DICOM peers the tests drive (Debian dcmtk, dicom3tools, orthanc).
test-peers:
	bash scripts/install-test-peers.sh

lint: setup
	$(BIN)/ruff check node ai tests bench
	$(BIN)/mypy

unit: setup
	$(BIN)/pytest tests/unit

integration: setup test-peers
	$(BIN)/pytest tests/integration

## Set up, install the peers, lint, type-check and run the whole suite.
test: setup test-peers lint
	$(BIN)/pytest tests

## Bounded benchmark suite (~10 min on 2 cores); never part of `make test`.
bench: setup test-peers
	$(PY) -m bench.run

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
