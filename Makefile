# `make run` sets up and serves the proxy; `make test` sets up and runs every check CI runs.
VENV ?= .venv
PY := $(VENV)/bin/python
ARGS ?=

.PHONY: run test system-deps lint bench

$(VENV)/.run: setup.cfg pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.test: $(VENV)/.run
	$(PY) -m pip install -q -e '.[test]'
	touch $@

run: $(VENV)/.run
	$(VENV)/bin/ollamamq $(ARGS)

system-deps:
	sh scripts/install-system-deps.sh

lint: $(VENV)/.test
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: system-deps lint
	$(VENV)/bin/pytest

$(VENV)/.bench: $(VENV)/.test
	$(PY) -m pip install -q -e '.[test,bench]'
	touch $@

bench: $(VENV)/.bench
	$(PY) bench/proxy_bench.py $(ARGS)
