# Everything a new machine needs: `make demo` and `make test` set themselves up.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
STATE ?= .state
DEMO_DIR ?= $(STATE)/demo
export PREFECT_HOME ?= $(abspath $(STATE))/prefect
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: setup test test-fast lint demo eval server worker deploy lock clean gpu-check

setup: $(STAMP)

# Re-runs only when the dependency files change. torch/torchvision are pinned (2.14.1 / 0.29.1):
# pip on Python 3.11 takes that pair from local disk; the rest is locked in constraints.txt.
$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade "pip>=24" 2>&1 | grep -v '^WARNING: Location' || true
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]' 2>&1 | grep -v '^WARNING: Location' ; test $${PIPESTATUS[0]} -eq 0
	@touch $(STAMP)

test: setup
	@mkdir -p "$(PREFECT_HOME)"
	$(BIN)/python -m pytest -q --timeout=900 --durations=30 tests

test-fast: setup
	@mkdir -p "$(PREFECT_HOME)"
	$(BIN)/python -m pytest -q --timeout=600 -m "not slow" tests

lint: setup
	$(BIN)/ruff check ssd_core flows tests

lock: setup
	{ echo "# The lock: exact versions a fresh 'make setup' resolves to (pip -c). Regenerate with 'make lock'."; \
	  $(BIN)/python -m pip freeze --exclude-editable | grep -vi '^ssd-pipeline'; } > constraints.txt

clean:
	rm -rf $(VENV) $(STATE) .pytest_cache

# A GPU node measured before anything is deployed to it (docs/gpu.md): the stock CUDA PyTorch image's own
# python3 with the source on PYTHONPATH, no venv and no setup. GPU_CHECK_ARGS="--device cpu": the CPU dry run.
GPU_CHECK_PYTHON ?= python3
GPU_CHECK_JSON ?= $(STATE)/gpu-check.json
GPU_CHECK_ARGS ?=
gpu-check:
	@PYTHONPATH="$(CURDIR)" $(GPU_CHECK_PYTHON) -m ssd_core.gpucheck --json "$(GPU_CHECK_JSON)" $(GPU_CHECK_ARGS)

# ---- Prefect: the demo, the report, and a local server + process worker for the deployments
PREFECT_PORT ?= 4200
PREFECT_POOL ?= ssd-process

# The whole pipeline through the Prefect flows in ephemeral mode (no server): synthetic data, Ray
# training, COCO report, bulk detection, a DuckDB query. About 15 minutes on 2 CPU cores.
demo: setup
	$(BIN)/python -m flows.demo --dir $(DEMO_DIR)

# The COCO report of the latest demo run (make demo first).
eval: setup
	@test -f $(DEMO_DIR)/run/last.pt -a -f $(DEMO_DIR)/data/annotations/instances_val.json || \
	  { echo "no demo run yet ($(DEMO_DIR)/run/last.pt): run 'make demo' first" >&2; exit 1; }
	$(BIN)/ssd eval --weights $(DEMO_DIR)/run/last.pt --data $(DEMO_DIR)/data --output $(DEMO_DIR)/report

# A Prefect server on 127.0.0.1 (SQLite under PREFECT_HOME); UI at http://127.0.0.1:$(PREFECT_PORT).
server: setup
	$(BIN)/prefect server start --host 127.0.0.1 --port $(PREFECT_PORT)

# A process worker for the pool the deployments use (creates the pool on first start).
worker: export PREFECT_API_URL ?= http://127.0.0.1:$(PREFECT_PORT)/api
worker: setup
	$(BIN)/prefect worker start --pool $(PREFECT_POOL) --type process

# Registers every deployment in prefect.yaml with the server (creating the pool if no worker has yet).
deploy: export PREFECT_API_URL ?= http://127.0.0.1:$(PREFECT_PORT)/api
deploy: setup
	$(BIN)/prefect work-pool inspect $(PREFECT_POOL) >/dev/null 2>&1 || \
	  $(BIN)/prefect work-pool create $(PREFECT_POOL) --type process
	$(BIN)/prefect --no-prompt deploy --all

