# One entry point for people and CI. `make run` and `make test` work on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
WEB_PORT ?= 6066
DATA_DIR ?= .data/worker1
PYTEST_ARGS ?=

.PHONY: help venv constraints run worker test test-unit test-agents lint format stack-up stack-down stack-status stack-reset registry-up registry-down kill-rounds chaos cluster-up cluster-down cluster-status cluster-test chaos-cluster bench clean

help:
	@echo "make run          set up, start the local stack and one worker (foreground)"
	@echo "make test         set up, start the local stack, run the whole test suite"
	@echo "make test-unit    pure-core and codec tests only (no services)"
	@echo "make test-agents  the ledger and saga handlers over in-memory Kafka fakes (no services)"
	@echo "make stack-up | stack-down | stack-status | stack-reset"
	@echo "make kill-rounds  many rounds of kill -9 against a worker (ROUNDS=50)"
	@echo "make chaos        N rounds of flash sales under faults, I1..I6 checked (CHAOS_ROUNDS=10, CHAOS_SEED=)"
	@echo "make cluster-up | cluster-down | cluster-status   the local 3-node Kafka cluster (ports 19092-19094)"
	@echo "make cluster-test the leader of the hot partition killed mid-sale on the cluster (RF 3, min ISR 2)"
	@echo "make chaos-cluster  chaos rounds on the cluster, with the leader_kill fault (CHAOS_ROUNDS=5)"
	@echo "make bench        benchmarks vs PostgreSQL, Redis and bare Kafka; writes bench/REPORT.md"
	@echo "make lint | format"

# every pip install takes constraints.txt: the exact versions the project is tested with
CONSTRAINTS := -c constraints.txt

$(VENV)/.installed: setup.cfg pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip $(CONSTRAINTS)
	$(PY) -m pip install -q -e '.[test]' $(CONSTRAINTS)
	@touch $@

venv: $(VENV)/.installed

stack-up:
	@scripts/stack.sh up

stack-down:
	@scripts/stack.sh down

stack-status:
	@scripts/stack.sh status

stack-reset:
	@scripts/stack.sh reset

# Apicurio Registry (Confluent-compatible API); the registry tests start it themselves
registry-up:
	@scripts/registry.sh up

registry-down:
	@scripts/registry.sh down

run: venv stack-up
	@mkdir -p $(DATA_DIR)
	@echo "worker:  http://127.0.0.1:$(WEB_PORT)/healthz   stock: http://127.0.0.1:$(WEB_PORT)/stock/<sku>   metrics: http://127.0.0.1:$(WEB_PORT)/metrics"
	@echo "produce: $(PY) -m pipeline.produce send RestockReceived '{\"sku\":\"SKU-1\",\"qty\":10}'"
	INVENTORY_WEB_PORT=$(WEB_PORT) INVENTORY_DATA_DIR=$(DATA_DIR) \
	  $(VENV)/bin/faust -A pipeline.app --datadir $(DATA_DIR) worker --web-port $(WEB_PORT) -l info

# pytest exit 5 (no test collected) is a failure here, not a pass
test: venv lint stack-up
	@scripts/stack.sh test-deps
	@rc=0; $(PY) -m pytest $(PYTEST_ARGS) || rc=$$?; \
	  if [ $$rc = 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$rc

test-unit: venv
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

# the agent tier: the real ledger engine and saga handler, Kafka faked at its I/O boundary
test-agents: venv
	$(PY) -m pytest tests/agents $(PYTEST_ARGS)

# Benchmarks (not tests): PostgreSQL from Debian for the baseline, report in bench/REPORT.md
bench: venv stack-up
	@command -v pg_ctlcluster >/dev/null || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || \
	  { [ "$$(id -u)" = 0 ] && apt-get install -y -qq postgresql; } || \
	  { echo "PostgreSQL is missing: sudo apt-get install -y postgresql" >&2; exit 1; }
	$(PY) -m pip install -q -e '.[test,bench]' $(CONSTRAINTS)
	$(PY) -m bench.run

CHAOS_ROUNDS ?= 10
CHAOS_SEED ?=
chaos: venv stack-up
	CHAOS_ROUNDS=$(CHAOS_ROUNDS) CHAOS_SEED=$(CHAOS_SEED) $(PY) tests/chaos/run_chaos.py

# A real Kafka cluster beside the single broker: 3 KRaft nodes (scripts/stack.sh cluster-*)
cluster-up:
	@scripts/stack.sh cluster-up

cluster-down:
	@scripts/stack.sh cluster-down

cluster-status:
	@scripts/stack.sh cluster-status

# marked `cluster`, so not in `make test`; the test starts the cluster itself when it is down
cluster-test: venv stack-up
	$(PY) -m pytest tests/integration/test_cluster_leader_kill.py -m cluster -s $(PYTEST_ARGS)

CHAOS_CLUSTER_ROUNDS ?= 5
chaos-cluster: venv stack-up cluster-up
	CHAOS_ROUNDS=$(CHAOS_CLUSTER_ROUNDS) CHAOS_SEED=$(CHAOS_SEED) $(PY) tests/chaos/run_chaos.py --cluster

ROUNDS ?= 50
kill-rounds: venv stack-up
	KILL_ROUNDS=$(ROUNDS) $(PY) -m pytest tests/integration/test_crash.py -m slow -s $(PYTEST_ARGS)

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports
	$(VENV)/bin/mypy

format: venv
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# after changing setup.cfg's requirements: install without constraints into a fresh venv,
# test, then pin what got installed (pip itself included)
constraints:
	@{ sed -n '1,3p' constraints.txt; echo "pip==$$($(PY) -m pip --version | cut -d' ' -f2)"; \
	  $(PY) -m pip freeze --exclude-editable; } > constraints.txt.new && mv constraints.txt.new constraints.txt

clean:
	rm -rf .data test-output .pytest_cache
