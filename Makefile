# meterstream — `make help` lists the targets.
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# The locks (README, Development): what `make` installs, and what the image installs.
LOCK   := requirements/dev.txt
RUNTIME_LOCK := requirements/runtime.txt
# The producer SDK alone (clients/python, meterstream-client), at the dev lock's versions.
CLIENT_LOCK := requirements/client.txt
PYTEST_ARGS ?=
DURATION ?= 0

.DEFAULT_GOAL := help

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F ':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(BIN)/python:
	@command -v $(PYTHON) >/dev/null || { echo "needs $(PYTHON) (set PYTHON=...)"; exit 1; }
	$(PYTHON) -m venv $(VENV)

# Exactly the lock (every download hash-checked; pip itself is pinned there too), then
# meterstream editable with no dependency of its own, built by the locked setuptools.
$(STAMP): $(BIN)/python pyproject.toml Makefile $(LOCK) requirements/sync.py
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --require-hashes -r $(LOCK)
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	$(BIN)/python requirements/sync.py $(LOCK) meterstream
	@touch $(STAMP)

install: $(STAMP) kafka-jars ## create .venv, install exactly requirements/dev.txt, then meterstream; fetch Kafka's jars

# The embedded Apache Kafka's jars (deploy/kafka/pom.xml, Kafka's version in
# docker-compose.yml), fetched once into deploy/kafka/jars (git-ignored; offline after).
# Without Java 17+ or Maven this says why and the embedded broker is Tansu.
KAFKA_POM  := deploy/kafka/pom.xml
KAFKA_JARS := deploy/kafka/jars

kafka-jars: ## fetch Apache Kafka's jars with Maven, once (skipped without Java 17+ and mvn)
	@if [ -f $(KAFKA_JARS)/.fetched ] && [ $(KAFKA_JARS)/.fetched -nt $(KAFKA_POM) ]; then exit 0; fi; \
	java=$$(command -v java || true); \
	major=$$([ -n "$$java" ] && java -version 2>&1 | sed -n 's/.* version "\(1\.\)\{0,1\}\([0-9]*\).*/\2/p' | head -n 1); \
	if [ -z "$$java" ]; then \
	  echo "kafka-jars: skipped, no java on PATH: the embedded broker will be Tansu"; \
	elif [ -z "$$major" ] || [ "$$major" -lt 17 ]; then \
	  echo "kafka-jars: skipped, Kafka needs Java 17+ ($$java is $${major:-of unknown version}): the embedded broker will be Tansu"; \
	elif ! command -v mvn >/dev/null 2>&1; then \
	  echo "kafka-jars: skipped, no mvn (Maven) on PATH: the embedded broker will be Tansu"; \
	else \
	  echo "kafka-jars: fetching Apache Kafka's jars with Maven into $(KAFKA_JARS)/ (once)"; \
	  rm -rf $(KAFKA_JARS).tmp; \
	  if mvn -q -B -f $(KAFKA_POM) dependency:copy-dependencies -DincludeScope=runtime \
	       -DoutputDirectory=$(CURDIR)/$(KAFKA_JARS).tmp >$(KAFKA_JARS).log 2>&1; then \
	    rm -rf $(KAFKA_JARS) $(KAFKA_JARS).log && mv $(KAFKA_JARS).tmp $(KAFKA_JARS) && \
	    touch $(KAFKA_JARS)/.fetched; \
	  else \
	    rm -rf $(KAFKA_JARS).tmp; \
	    echo "kafka-jars: Maven could not fetch the jars (offline?), see $(KAFKA_JARS).log: the embedded broker will be Tansu"; \
	  fi; \
	fi

run: $(STAMP) kafka-jars ## start the embedded stack with the example meters and a demo load (Ctrl-C stops)
	$(BIN)/meterstream run --meters meters.example.yaml --demo $(if $(filter-out 0,$(DURATION)),--duration $(DURATION),)

# mypy and import-linter read the import name `meterstream` from build/lint/, a tree of
# links laid from pyproject.toml's package-dir mapping (tools/lint_tree.py): they do not run
# the editable install's import hook that maps pipeline/, sinks/ and topics/ at run time.
# (mypy names a file by its link there: build/lint/meterstream/worker/app.py is
# pipeline/worker/app.py.) lint-imports checks the dependency rules (README, Layout).
lint: $(STAMP) ## ruff check, ruff format --check, mypy, the dependency rules (lint-imports)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python tools/lint_tree.py
	$(BIN)/mypy
	PYTHONPATH=build/lint $(BIN)/lint-imports --no-cache

# The billing page's browser tests drive Debian's Chromium (Playwright's own download does
# not work here); installed once where apt-get can (root), else they say what is missing.
browser: ## install Debian's chromium for the page tests (once; needs apt-get as root)
	@if [ -x /usr/bin/chromium ]; then exit 0; fi; \
	if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  echo "browser: installing Debian's chromium (once)"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null) \
	    || echo "browser: apt-get could not install chromium: the page tests will fail and say so"; \
	else \
	  echo "browser: no /usr/bin/chromium; install Debian's chromium (apt-get install chromium) for the page tests"; \
	fi

# Two pytest sessions side by side (pytest-xdist; TEST_WORKERS=0 for one): the suite mostly
# waits on brokers, workers and timers, so two take ~23 min where one took ~45 on 2 cores.
# Each session has its own broker, Stripe emulator and chdb path; an idle one takes the
# other's pending tests (worksteal).
TEST_WORKERS ?= 2
test: lint kafka-jars browser ## lint, then every test (unit, integration and faults on the real embedded stack)
	$(BIN)/pytest -q -p no:cacheprovider $(if $(filter-out 0,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist worksteal,) $(PYTEST_ARGS)

unit: $(STAMP) ## the fast tests only (no broker)
	$(BIN)/pytest -q tests/unit $(PYTEST_ARGS)

format: $(STAMP) ## apply ruff format and autofixes
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# A soak runs on RocksDB (what the deployment files use) unless STORE says otherwise: the
# memory store keeps every dedup key of the horizon in the heap, so its RSS grows by design.
bench: $(STAMP) $(if $(filter kafka,$(BROKER)),kafka-jars) ## the throughput benchmark (BROKER=kafka: the production configuration; SOAK=600 adds an RSS soak; see bench/README.md)
	$(BIN)/python -m bench.run $(if $(BROKER),--broker $(BROKER),) $(if $(SOAK),--soak $(SOAK),) \
	  $(if $(or $(STORE),$(SOAK)),--store $(or $(STORE),rocksdb),)

bench-ingest: $(STAMP) ## the ingest benchmark: SDK and events API vs raw aiokafka
	$(BIN)/python -m bench.ingest

# uv re-resolves pyproject.toml's ranges, keeping every pin of the existing lock that still
# fits; the image's lock is the runtime subset at the same versions (-c the dev lock), and
# so is the SDK's (what its test installs into a fresh venv).
LOCK_FLAGS := --universal --python-version 3.11 --generate-hashes --quiet \
  --custom-compile-command 'make lock'

lock: $(STAMP) ## re-resolve the locks after a pyproject.toml change (moves nothing it need not)
	$(BIN)/uv pip compile $(LOCK_FLAGS) $(UPGRADE) pyproject.toml requirements/build.in \
	  --all-extras -o $(LOCK)
	$(BIN)/uv pip compile $(LOCK_FLAGS) $(UPGRADE) pyproject.toml requirements/build.in \
	  --extra rocksdb -c $(LOCK) -o $(RUNTIME_LOCK)
	$(BIN)/uv pip compile $(LOCK_FLAGS) $(UPGRADE) clients/python/pyproject.toml \
	  requirements/build.in -c $(LOCK) -o $(CLIENT_LOCK)

lock-upgrade: ## PACKAGE=name: its newest version allowed by pyproject.toml (no PACKAGE: all)
	$(MAKE) lock UPGRADE="$(if $(PACKAGE),--upgrade-package $(PACKAGE),--upgrade)"

.PHONY: lock lock-upgrade

compose-check: ## validate docker-compose.yml without a Docker engine
	docker-compose -f docker-compose.yml config --quiet

clean: ## remove the venv, Kafka's jars and local state
	rm -rf $(VENV) $(KAFKA_JARS) $(KAFKA_JARS).tmp $(KAFKA_JARS).log .meterstream .mypy_cache .ruff_cache .pytest_cache build/lint .import_linter_cache

.PHONY: help install kafka-jars browser run lint test unit format bench bench-ingest compose-check clean
