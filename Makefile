# Tollgate: `make run` runs the product (embedded default), `make test` runs every test.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PORT ?= 8000
MOCK_PORT ?= 9100

# Where the PostgreSQL + Redis half of the suite runs (pytest makes test_<name>).
TEST_DATABASE_URL ?= postgres://postgres@127.0.0.1:5432/test
TEST_REDIS_URL ?= redis://127.0.0.1:6379/15
# Test-only secrets: the PostgreSQL run uses DEBUG off, as production does.
TEST_SECRETS := SECRET_KEY=tollgate-test-secret-key-0123456789abcdefghijklmnopqrstuv \
	TOLLGATE_ENCRYPTION_KEYS=dGVzdC1vbmx5LWZlcm5ldC1rZXktMDEyMzQ1Njc4OWE= \
	ALLOWED_HOSTS=127.0.0.1,localhost,testserver

.PHONY: install run stack mock test lint test-postgres test-embedded browser nginx faketime bench bench-dashboard clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[dev]'
	touch $@

install: $(VENV)/.installed

run: install
	PORT=$(PORT) MOCK_PORT=$(MOCK_PORT) bin/run-embedded

stack: install
	bin/run-stack

mock: install
	$(PY) -m routing.mockprovider --host 127.0.0.1 --port $(MOCK_PORT)

test: install browser nginx faketime lint test-postgres test-embedded

# The dashboard's browser tests drive Debian's Chromium (Playwright's own download
# cannot run here); install it once if it is missing.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser:
	@test -x /usr/bin/chromium || { echo "Installing Debian's chromium for the browser tests"; \
		$(SUDO) apt-get update -qq && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

# The reverse-proxy test runs deploy/nginx.conf in front of a gateway (it skips without nginx).
nginx:
	@command -v nginx >/dev/null || test -x /usr/sbin/nginx || { echo "Installing nginx-light for the reverse-proxy test"; \
		$(SUDO) apt-get update -qq && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light >/dev/null; }

# The clock-skew tests run gateways under libfaketime (they skip without it).
faketime:
	@test -e /usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1 || { echo "Installing libfaketime for the clock-skew tests"; \
		$(SUDO) apt-get update -qq && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq faketime >/dev/null; }

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

# Most tests wait on servers they started, so the suite runs on pytest-xdist workers (three
# were faster here but made fault tests' timing flaky on two cores); each worker has its own
# database and Redis database (tests/support/parallel.py).
TEST_WORKERS ?= 2
PYTEST := $(PY) -m pytest -p tests.support.parallel -n $(TEST_WORKERS) --dist worksteal

test-postgres: install
	env DATABASE_URL=$(TEST_DATABASE_URL) REDIS_URL=$(TEST_REDIS_URL) DEBUG=false $(TEST_SECRETS) \
		$(PYTEST) $(PYTEST_ARGS)

test-embedded: install
	env -u DATABASE_URL -u REDIS_URL -u SECRET_KEY -u TOLLGATE_ENCRYPTION_KEYS -u DEBUG \
		$(PYTEST) $(PYTEST_ARGS)

# Proxy benchmark: Tollgate vs LiteLLM Proxy vs direct to the mock, interleaved rounds
# (PostgreSQL scratch database, Redis db 8; installs wrk and LiteLLM on first use).
# Writes bench/RESULTS.md; e.g. `make bench BENCH_ARGS="--rounds 1"`.
BENCH_ARGS ?= --rounds 3
bench: install
	$(PY) bench/proxy.py $(BENCH_ARGS)

# Dashboard render times with a month of usage for 300 keys (PostgreSQL + Redis).
bench-dashboard: install
	$(PY) bench/dashboard_pages.py

clean:
	rm -rf $(VENV) var
