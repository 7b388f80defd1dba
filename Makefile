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

.PHONY: setup test test-fast lint demo eval server worker deploy lock clean bench

setup: $(STAMP)

# Re-runs only when the dependency files change. torch/torchvision are pinned (2.14.1 / 0.29.1):
# pip on Python 3.11 takes that pair from local disk; the rest is locked in constraints.txt.
$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade "pip>=24" 2>&1 | grep -v '^WARNING: Location' || true
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]' 2>&1 | grep -v '^WARNING: Location' ; test $${PIPESTATUS[0]} -eq 0
	@touch $(STAMP)

test: setup
	$(BIN)/python -m pytest -q --timeout=900 tests

test-fast: setup
	$(BIN)/python -m pytest -q --timeout=600 -m "not slow" tests

lint: setup
	$(BIN)/ruff check ssd_core flows tests

lock: setup
	{ echo "# The lock: exact versions a fresh 'make setup' resolves to (pip -c). Regenerate with 'make lock'."; \
	  $(BIN)/python -m pip freeze --exclude-editable | grep -vi '^ssd-pipeline'; } > constraints.txt

clean:
	rm -rf $(VENV) $(STATE) .pytest_cache
