# opsdrill: `make verify` runs every check (local stack unless INVENTORY=...),
# `make test` runs our own tests. Both install what they need first (idempotently).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
INVENTORY ?=
ALLURE_RESULTS ?= reports/allure-results
PYTEST_WORKERS ?= 2
STAMP := $(VENV)/.installed

.PHONY: setup system verify test lint bench clean

setup: system $(STAMP)

system:
	@PYTHON=$(PYTHON) scripts/bootstrap-system.sh

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -m pip install -q --disable-pip-version-check --upgrade pip
	@$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[dev]'
	@touch $(STAMP)

verify: setup
	rm -rf $(ALLURE_RESULTS)
	$(BIN)/python -m pytest checks -p no:cacheprovider -n $(PYTEST_WORKERS) --dist loadgroup \
		--alluredir $(ALLURE_RESULTS) $(if $(INVENTORY),--inventory $(INVENTORY))

test: setup lint
	$(BIN)/python -m pytest tests -n $(PYTEST_WORKERS)

lint: setup
	$(BIN)/ruff check opsdrill fixtures checks tests benchmarks conftest.py
	$(BIN)/ruff format --check opsdrill fixtures checks tests benchmarks conftest.py
	$(BIN)/mypy

bench: setup
	$(BIN)/python benchmarks/bench_backup.py $(BENCH_ARGS)
	$(BIN)/python benchmarks/bench_mirror.py $(MIRROR_BENCH_ARGS)

clean:
	rm -rf $(VENV) reports/allure-results .pytest_cache
