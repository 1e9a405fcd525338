# Every target is idempotent: a second run reuses the venvs, the data package and healthy servers.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
LS_VERSION := 1.23.2
LOGS := .flywheel-logs
# .venv is reinstalled only when pyproject.toml changes: its hash names the stamp file.
PYPROJECT_SHA := $(shell sha256sum pyproject.toml | cut -c1-16)
VENV_STAMP := .venv/.installed-$(PYPROJECT_SHA)
LS_STAMP := .ls-venv/.installed-label-studio-$(LS_VERSION)
SERVICES := infra/services
# The pytest session fixture's servers (tests/conftest.py): their own workspace and ports.
TEST_WS := $(or $(FLYWHEEL_TEST_WORKSPACE),$(CURDIR)/.flywheel-test)
TEST_ENV := FLYWHEEL_WORKSPACE=$(TEST_WS) FLYWHEEL_LABEL_STUDIO__PORT=18080 \
	FLYWHEEL_MLFLOW__PORT=15000 FLYWHEEL_PREFECT__PORT=14200
# The PostgreSQL pass (FLYWHEEL_TEST_DB=postgres): the local cluster on 127.0.0.1:15432 and its own MLflow and
# Prefect servers, storing there, in $(TEST_WS)/postgres. PG_TESTS: the integration tests it repeats.
PG_TEST_ENV := FLYWHEEL_WORKSPACE=$(TEST_WS)/postgres FLYWHEEL_LABEL_STUDIO__PORT=18080 \
	FLYWHEEL_MLFLOW__PORT=15001 FLYWHEEL_PREFECT__PORT=14201 FLYWHEEL_POSTGRES__PORT=15432
PG_TESTS ?= tests/integration/test_postgres.py tests/integration/test_webhook.py tests/integration/test_provenance.py \
	tests/integration/test_review.py tests/integration/test_deployments.py

# pip prints thousands of "Location ... is ignored" warnings against the local mirrors: keep the full
# output in a log, show only real warnings/errors (and the log's tail when pip fails).
define pip_install
	mkdir -p $(LOGS)
	echo "pip install $(2) into $(1) (log: $(LOGS)/$(3))"
	if ! $(1)/bin/pip install $(2) >$(LOGS)/$(3) 2>&1; then \
		grep -v -E 'Location .* is ignored' $(LOGS)/$(3) | tail -n 40; \
		echo "pip failed: full output in $(LOGS)/$(3)" >&2; exit 1; \
	fi
	grep -E '^(WARNING|ERROR)' $(LOGS)/$(3) | grep -v -E 'Location .* is ignored' | head -n 20 || true
endef

# A full disk makes pip fail halfway with "[Errno 28] No space left on device": say so up front, with the
# numbers. $(1): the venv, $(2): the GiB its install needs (the torch CUDA build alone is about 5.5 GiB).
define require_free_disk
	free=$$(df --output=avail -BG . | tail -n 1 | tr -dc '0-9'); \
	if [ "$$free" -lt $(2) ]; then \
		echo "not enough disk to install $(1): $$free GiB free on $$(df --output=target . | tail -n 1), $(2) GiB needed" >&2; \
		exit 1; \
	fi
endef

.PHONY: help setup fashion-mnist postgresql services stop demo deploy demo-served test lint clean

help:
	@echo "make setup | services | stop | demo | deploy | demo-served | test | lint | clean"

setup: $(VENV_STAMP) $(LS_STAMP) fashion-mnist postgresql

$(VENV_STAMP):
	@$(call require_free_disk,.venv,9)
	@test -x .venv/bin/python || $(PYTHON) -m venv .venv
	@$(call pip_install,.venv,-e '.[dev]',pip-venv.log)
	@rm -f .venv/.installed-* && touch $@

# Label Studio lives in its own venv: its pins conflict with Prefect's.
$(LS_STAMP):
	@$(call require_free_disk,.ls-venv,2)
	@test -x .ls-venv/bin/python || $(PYTHON) -m venv .ls-venv
	@$(call pip_install,.ls-venv,label-studio==$(LS_VERSION),pip-ls-venv.log)
	@rm -f .ls-venv/.installed-* && touch $@

fashion-mnist:
	@if ! dpkg -s dataset-fashion-mnist >/dev/null 2>&1; then \
		sudo=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		echo "installing apt package dataset-fashion-mnist"; \
		$$sudo apt-get update -qq && $$sudo apt-get install -y -qq dataset-fashion-mnist; \
	fi

# Debian's PostgreSQL server binaries (initdb, pg_ctl): flywheel.postgres runs its own cluster with them.
postgresql:
	@if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then \
		sudo=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		echo "installing apt package postgresql"; \
		$$sudo apt-get update -qq && $$sudo apt-get install -y -qq postgresql; \
	fi

services: setup
	@$(SERVICES) start

# Stops the demo's servers and the test servers, only those started from these workspaces.
stop:
	@if [ -x .venv/bin/python ]; then \
		.venv/bin/python -m flows.worker stop; \
		$(SERVICES) stop; \
		$(TEST_ENV) $(SERVICES) stop; \
		$(PG_TEST_ENV) $(SERVICES) stop; \
		$(PG_TEST_ENV) .venv/bin/python -m flywheel.postgres stop; \
	fi

demo: services
	.venv/bin/flywheel demo

# The flywheel as Prefect deployments on the local server (round on a cron, sync on an interval and on
# annotation events, finetune on flywheel.labels.threshold-reached), a process work pool and a detached
# worker (log and pid under the workspace; `make stop` ends it).
deploy: services
	.venv/bin/python -m flows.deploy up

# The demo's loop through the deployments, run by the worker: watch it in the Prefect UI.
demo-served: deploy
	.venv/bin/python -m flows.served

# The pytest session fixture starts (or reuses) the test servers itself. Then the PostgreSQL pass repeats the
# integration tests that use the catalog, MLflow and Prefect with all three on PostgreSQL. Both passes always run.
test: setup
	@status=0; \
	.venv/bin/python -m pytest -q || status=$$?; \
	echo "== PostgreSQL pass: FLYWHEEL_TEST_DB=postgres pytest $(PG_TESTS)"; \
	FLYWHEEL_TEST_DB=postgres .venv/bin/python -m pytest -q $(PG_TESTS) || status=$$?; \
	exit $$status

lint: $(VENV_STAMP)
	.venv/bin/ruff check .

# Removes the workspaces (data, logs, servers' state), never the venvs.
clean: stop
	rm -rf .flywheel $(TEST_WS) $(LOGS)
