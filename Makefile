# opsdrill: `make verify` runs every check (local stack unless INVENTORY=...),
# `make test` runs our own tests. Both install what they need first (idempotently).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
INVENTORY ?=
ALLURE_RESULTS ?= reports/allure-results
PYTEST_WORKERS ?= 2
STAMP := $(VENV)/.installed
# node_modules (package-lock.json): Allure 3 for `make report`, BullMQ for the queue tests.
NPM_STAMP := node_modules/.opsdrill-installed

.PHONY: setup system verify test test-quick lint bench bench-peers clean

setup: system $(STAMP)

system:
	@PYTHON=$(PYTHON) scripts/bootstrap-system.sh

# opsdrill with its dev tools, and the local stack: its own distribution (never in
# opsdrill's wheel), installed editable beside it; it adds `opsdrill stack`.
$(STAMP): pyproject.toml opsdrill_stack/pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -m pip install -q --disable-pip-version-check --upgrade pip
	@$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[dev]' -e ./opsdrill_stack
	@touch $(STAMP)

# The same job as scripts/verify, which the README gives as the main command: make exits 2
# for any failed recipe, so only the script keeps the check run's 0/1/2 apart.
verify:
	@INVENTORY=$(INVENTORY) ALLURE_RESULTS=$(ALLURE_RESULTS) PYTEST_WORKERS=$(PYTEST_WORKERS) \
		PYTHON=$(PYTHON) scripts/verify

# The queue tests drive a real BullMQ queue with the package from npm: node_modules first
# (npm ci once per package-lock.json change, offline afterwards).
test: setup lint $(NPM_STAMP)
	$(BIN)/python -m pytest tests -n $(PYTEST_WORKERS)

# The quick tests alone (tests/unit: no server, no container): about a minute.
test-quick: setup
	$(BIN)/python -m pytest tests -m unit -n $(PYTEST_WORKERS)

lint: setup
	$(BIN)/ruff check opsdrill opsdrill_stack opsdrill_pytest opsdrill_checks tests benchmarks
	$(BIN)/ruff format --check opsdrill opsdrill_stack opsdrill_pytest opsdrill_checks tests benchmarks
	$(BIN)/mypy

# The peer tools the benchmarks compare with (pgBackRest, rclone, checkdmarc,
# check_email_delivery): installed when missing, never by `make setup`.
bench-peers:
	@PYTHON=$(PYTHON) scripts/bench-peers.sh

bench: setup bench-peers
	$(BIN)/python benchmarks/bench_backup.py $(BENCH_ARGS)
	$(BIN)/python benchmarks/bench_mirror.py $(MIRROR_BENCH_ARGS)
	$(BIN)/python benchmarks/bench_dns.py $(DNS_BENCH_ARGS)
	$(BIN)/python benchmarks/bench_mail.py $(MAIL_BENCH_ARGS)
	$(BIN)/python benchmarks/bench_container_drill.py $(CONTAINER_BENCH_ARGS)
	$(BIN)/python benchmarks/bench_startup.py $(STARTUP_BENCH_ARGS)

clean:
	rm -rf $(VENV) reports/allure-results .pytest_cache

# The Allure 3 report (pinned in package-lock.json, installed into node_modules/ once, then
# offline): `make report` writes the normal report and a single-file one and appends the run
# to the history file that the next report reads; `make report-serve` serves it on 127.0.0.1.
ALLURE_REPORT ?= reports/allure-report
ALLURE_REPORT_SINGLE ?= reports/allure-report-single
ALLURE_HISTORY ?= reports/history.jsonl
REPORT_PORT ?= 8000
# python -m opsdrill_pytest.report (shipped in the wheel) finds Allure in node_modules/.
REPORT_ENV = ALLURE_RESULTS=$(ALLURE_RESULTS) ALLURE_REPORT=$(ALLURE_REPORT) \
	ALLURE_REPORT_SINGLE=$(ALLURE_REPORT_SINGLE) ALLURE_HISTORY=$(ALLURE_HISTORY) \
	REPORT_PORT=$(REPORT_PORT) PYTHON=$(PYTHON)

.PHONY: report report-deps report-serve

report-deps: system $(NPM_STAMP)

$(NPM_STAMP): package.json package-lock.json
	@command -v npm >/dev/null || { echo "npm is missing (make system installs it)" >&2; exit 2; }
	@npm ci --no-audit --no-fund --loglevel=error
	@touch $(NPM_STAMP)

report: report-deps
	@$(REPORT_ENV) $(BIN)/python -m opsdrill_pytest.report generate

report-serve: report-deps
	@$(REPORT_ENV) $(BIN)/python -m opsdrill_pytest.report serve
