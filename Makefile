# ModelMerge — developer entry points. Everything runs from the repo's own .venv/.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha1sum | cut -c1-12)
PRECOMPILE ?= --max-models 4 --dtypes bfloat16
ENGINE_SOURCES := $(shell find merge_image/modelmerge_engine -name '*.py' | LC_ALL=C sort)
PRECOMPILED := $(VENV)/.precompiled-$(shell cat $(ENGINE_SOURCES) | sha1sum | cut -c1-12)-$(shell echo '$(PRECOMPILE)' | sha1sum | cut -c1-8)
HOST ?= 127.0.0.1
PORT ?= 5000

.PHONY: install run test test-unit lint crds envtest bench bench-engine bench-methods bench-operator bench-api bench-sweep bench-report operator images kind-e2e clean

install: $(STAMP) $(PRECOMPILED)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[engine,gpu,operator,api,dev]'
	rm -f $(VENV)/.installed-* && touch $@

# Then numba's kernels are compiled for every method in the default dtype (bfloat16) with 1-4 fine-tunes, so that
# such merges pay no compile (modelmerge_engine/precompile.py), again whenever the engine's sources change (numba's
# cache keys include them): a test process that compiled every kernel itself would outgrow numba's labels (see
# precompile.py) and fail. Every dtype with 1-8 fine-tunes takes far longer on two cores (~375 s for bfloat16 alone
# when busy): PRECOMPILE='--max-models 8 --dtypes bfloat16,float16,float32' asks for it; PRECOMPILE=skip skips it.
# Other merges compile on first use, once.
$(PRECOMPILED): $(STAMP)
	[ "$(PRECOMPILE)" = skip ] || $(BIN)/python -m modelmerge_engine.precompile $(PRECOMPILE)
	rm -f $(VENV)/.precompiled-* && touch $@

# The main job on its embedded default: the REST API with the local backend on port 5000.
run: install
	$(BIN)/modelmerge serve --host $(HOST) --port $(PORT)

test: install envtest
	$(BIN)/python -m pytest -q

test-unit: install
	$(BIN)/python -m pytest -q -m 'not integration'

lint: install
	$(BIN)/ruff check .

crds: install
	$(BIN)/modelmerge crds --output crds/

envtest:
	bash hack/envtest.sh

# The recorded benchmarks (bench/results/*.json, then the README tables): engine, operator and API, about 5 hours on
# the 2-core machine (engine ~4.5 h: 3 tools x 5 methods x 2 and 8 fine-tunes x cold/warm x 5 runs, plus the
# memory-limit runs). Run as root on a quiet machine: drop_caches and memory cgroups. --smoke flags for a quick check.
bench: bench-engine bench-operator bench-api bench-report

# mergekit runs in its own virtualenv, the one the oracle tests use (tests/helpers/mergekit.py makes it on first use).
bench-engine: install
	$(BIN)/python bench/bench_engine.py

# A missed target is recorded in the results (target_met), not a reason to stop the other benchmarks.
# mergekit's methods against mergekit from the same YAML (issue 11; ~3 h, resumable with --resume).
bench-methods: install
	$(BIN)/python bench/bench_engine.py --suite mergekit

bench-operator: install envtest
	-$(BIN)/python bench/bench_operator.py

bench-api: install envtest
	$(BIN)/python bench/bench_api.py

# A sweep of 200 trials on the test control plane, and a real 9-point grid through the local backend against separate
# CLI runs, with and without the work cache (~1 h for 5 runs on the 2-core machine); niced for a shared machine.
bench-sweep: install envtest
	nice -n 19 $(BIN)/python bench/bench_sweep.py

bench-report: install
	$(BIN)/python bench/report.py --write

operator: install
	$(BIN)/modelmerge operator

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .bench

# ---- Kubernetes packaging: images, chart, kind ----------------------------------------------------------------
# `make test` already runs helm lint and the chart renders (tests/test_chart.py) and the chart's RBAC on envtest.
IMAGE_REGISTRY ?= ghcr.io/modelmerge
IMAGE_TAG ?= $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
# merge (CUDA torch) or merge-cpu (no torch: tagged $(IMAGE_TAG)-cpu)
MERGE_TARGET ?= merge
# e.g. MERGE_BUILD_ARGS='--build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu' (CPU torch in `merge`)
MERGE_BUILD_ARGS ?=
# The merge image's numba precompile (merge_image/Dockerfile's PRECOMPILE): empty for its default, every method and
# dtype with 1-8 fine-tunes, as release images ship (not measured on two cores: well beyond the ~375 s of the
# install's bfloat16 1-4 above, so tens of minutes; a layer cached until the engine's sources change); `skip`, or
# narrower arguments: '--methods task_arithmetic --dtypes bfloat16 --max-models 2' (tests/test_containers_e2e.py)
# takes ~10 s.
MERGE_PRECOMPILE ?=

.PHONY: helm-lint chart-crds base-image

# The three images with docker or podman (CONTAINER_ENGINE overrides), cached by content hash (hack/images.sh).
images:
	IMAGE_REGISTRY='$(IMAGE_REGISTRY)' IMAGE_TAG='$(IMAGE_TAG)' MERGE_TARGET='$(MERGE_TARGET)' \
	  MERGE_BUILD_ARGS='$(MERGE_BUILD_ARGS)' MERGE_PRECOMPILE='$(MERGE_PRECOMPILE)' bash hack/images.sh

# The local python 3.11 bookworm base (mmdebstrap) that `make images` uses when the registry's cannot be pulled.
base-image:
	bash hack/base-image.sh

# kind cluster → images → helm install → examples/modelmerge-tiny.yaml → Succeeded → output through the API.
kind-e2e: install
	bash hack/kind-e2e.sh

# helm lint --strict and the renders of every notable values combination (the same tests `make test` runs).
helm-lint: install
	$(BIN)/python -m pytest -q tests/test_chart.py

# Copies the generated CRDs into the chart (tests/test_chart.py fails when they differ from `modelmerge crds`).
chart-crds: install
	$(BIN)/modelmerge crds --output charts/modelmerge/crds/
