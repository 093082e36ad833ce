# ModelMerge — developer entry points. Everything runs from the repo's own .venv/.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha1sum | cut -c1-12)
HOST ?= 127.0.0.1
PORT ?= 5000

.PHONY: install run test test-unit lint crds envtest bench images kind-e2e clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[engine,operator,api,dev]'
	rm -f $(VENV)/.installed-* && touch $@

# The main job on its embedded default: the REST API with the local backend on port 5000.
run: install
	$(BIN)/modelmerge serve --host $(HOST) --port $(PORT)

test: install
	$(BIN)/python -m pytest -q

test-unit: install
	$(BIN)/python -m pytest -q -m 'not integration'

lint: install
	$(BIN)/ruff check .

crds: install
	$(BIN)/modelmerge crds --output crds/

envtest:
	bash hack/envtest.sh

bench: install
	$(BIN)/python bench/bench_engine.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .bench
