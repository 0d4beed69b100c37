# One entry point for people and CI. `make serve` sets up and serves the demo
# model; `make test` sets up and runs every check CI runs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Pinned: a range would let pip fetch a multi-GB CUDA build of torch.
TORCH ?= torch==2.13.0
ARGS ?=

.PHONY: setup serve test lint protos bench

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

serve: setup
	$(BIN)/pt2serve serve $(ARGS)

lint: setup
	$(BIN)/python protos/generate.py --check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: lint
	$(BIN)/python -m pytest $(ARGS)

protos: setup
	$(BIN)/python protos/generate.py
