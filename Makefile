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

# The scheduler and download tests once more under a clock 400 days ahead: no test may
# depend on the date it runs at.
CLOCK_TESTS := tests/test_downloads.py tests/test_downloads_persist.py

# The official ollama JavaScript library, for tests/test_js_client.py: local, nothing global.
tests/node_modules/.installed: tests/package.json tests/package-lock.json
	npm ci --prefix tests --no-audit --no-fund --loglevel=error
	touch $@

test: system-deps lint tests/node_modules/.installed
	$(VENV)/bin/pytest
	faketime -f +400d $(VENV)/bin/pytest -q $(CLOCK_TESTS)

$(VENV)/.bench: $(VENV)/.test
	$(PY) -m pip install -q -e '.[test,bench]'
	touch $@

bench: $(VENV)/.bench
	$(PY) bench/proxy_bench.py $(ARGS)
