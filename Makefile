# One entry point for people and CI. `make serve` sets up and serves the demo
# model; `make test` sets up and runs every check CI runs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch as pip installs it: from PyPI, 2.13.0 is the CUDA build (a 5.2 GB venv with 16
# nvidia-* wheels; it runs on the CPU too). For the CPU build, where an index serves
# it (deploy/docker/Dockerfile.cpu names PyTorch's): make setup TORCH="torch==2.13.0 --index-url URL"
TORCH ?= torch==2.13.0
ARGS ?=

.PHONY: setup serve test lint protos bench tools typecheck-tree

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

serve: setup
	$(BIN)/pt2serve serve $(ARGS)

# mypy reads the sources under the names they import by (pt2serve.*) through a
# tree of links; see [tool.mypy] in pyproject.toml.
typecheck-tree:
	@mkdir -p .typecheck/pt2serve
	@for d in service scheduler loader; do ln -sfn ../../$$d .typecheck/pt2serve/$$d; done

lint: setup typecheck-tree
	$(BIN)/python protos/generate.py --check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# External tools the tests run: Prometheus and promtool, haproxy (an L4 balancer, as
# a Kubernetes Service; Debian's packages, installed when running as root), kubectl
# (kustomize). hadolint comes with the dev extras.
tools:
	@if ! command -v promtool >/dev/null || ! command -v prometheus >/dev/null || \
	    ! PATH="$$PATH:/usr/sbin" command -v haproxy >/dev/null; then \
	  if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	    DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	    apt-get install -y -qq --no-install-recommends prometheus haproxy >/dev/null; \
	  else \
	    echo "the tests need Prometheus, promtool and haproxy: apt-get install prometheus haproxy (as root)"; exit 1; \
	  fi; \
	fi
	@command -v kubectl >/dev/null || { echo "the tests need kubectl (for kustomize)"; exit 1; }

test: lint tools
	$(BIN)/python -m pytest $(ARGS)

protos: setup
	$(BIN)/python protos/generate.py
