# Every target is idempotent: a second run reuses the venvs, the data package and healthy servers.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
LOGS := .flywheel-logs
# Every package of the three environments comes from a lock file with hashes (infra/lock/, written by
# `make lock`): .tools holds uv, installed by pip; uv installs .venv (the project) and .ls-venv (Label Studio,
# whose pins clash with Prefect's) from theirs. Each is re-synced only when its lock changes: the lock's
# hash names the stamp file.
LOCKS := infra/lock
UV := .tools/bin/uv
lock_hash = $(shell cat $(1) | sha256sum | cut -c1-16)
TOOLS_STAMP := .tools/.installed-$(call lock_hash,$(LOCKS)/tools.txt)
# pyproject.toml too: its package list shapes the editable install of the project itself.
VENV_STAMP := .venv/.installed-$(call lock_hash,$(LOCKS)/project.txt pyproject.toml)
LS_STAMP := .ls-venv/.installed-$(call lock_hash,$(LOCKS)/label-studio.txt)
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
# Test files run in TEST_WORKERS processes (pytest-xdist), a file's tests together in one (module fixtures): most
# integration tests wait on a server or a child process, so two share the 2 CI cores well.
TEST_WORKERS ?= 2
PYTEST_PARALLEL := -n $(TEST_WORKERS) --dist loadfile
# make upgrade-check: the newest versions the inputs allow, in throwaway venvs, against the fast tests.
UPGRADE_DIR := .upgrade-check
FAST_TESTS ?= tests/unit tests/integration/test_services.py tests/integration/test_labelstudio.py \
	tests/integration/test_loop.py

# A full disk makes an install fail halfway with "[Errno 28] No space left on device": say so up front, with
# the numbers. $(1): the venv, $(2): the GiB its install needs (the torch CUDA build alone is about 5.5 GiB).
define require_free_disk
	free=$$(df --output=avail -BG . | tail -n 1 | tr -dc '0-9'); \
	if [ "$$free" -lt $(2) ]; then \
		echo "not enough disk to install $(1): $$free GiB free on $$(df --output=target . | tail -n 1), $(2) GiB needed" >&2; \
		exit 1; \
	fi
endef

# $(1): the venv, $(2): its lock file. Creates the venv when missing, then makes it hold exactly the lock:
# missing packages installed, other versions replaced, packages the lock does not name removed.
define sync_venv
	test -x $(1)/bin/python || $(UV) venv --quiet --python $(PYTHON) $(1)
	echo "uv pip sync $(2) into $(1)"
	$(UV) pip sync --quiet --python $(1)/bin/python --require-hashes $(2)
endef

.PHONY: help setup lock upgrade-check fashion-mnist postgresql services stop demo deploy demo-served test lint \
	audit clean

help:
	@echo "make setup | lock | upgrade-check | services | stop | demo | deploy | demo-served | test | lint | audit | clean"

setup: $(VENV_STAMP) $(LS_STAMP) fashion-mnist postgresql

$(TOOLS_STAMP): $(LOCKS)/tools.txt
	@test -x .tools/bin/python || $(PYTHON) -m venv .tools
	@out=$$(.tools/bin/pip install --disable-pip-version-check --require-hashes --no-deps -r $(LOCKS)/tools.txt 2>&1) \
		|| { echo "$$out" | grep -v -E 'Location .* is ignored' >&2; exit 1; }
	@rm -f .tools/.installed-* && touch $@

# The project itself goes in editable, built by the locked setuptools (no build isolation: nothing unlocked).
$(VENV_STAMP): $(TOOLS_STAMP)
	@$(call require_free_disk,.venv,9)
	@$(call sync_venv,.venv,$(LOCKS)/project.txt)
	@$(UV) pip install --quiet --python .venv/bin/python --no-deps --no-build-isolation -e .
	@rm -f .venv/.installed-* && touch $@

$(LS_STAMP): $(TOOLS_STAMP)
	@$(call require_free_disk,.ls-venv,2)
	@$(call sync_venv,.ls-venv,$(LOCKS)/label-studio.txt)
	@rm -f .ls-venv/.installed-* && touch $@

# Re-resolves the lock files within pyproject.toml's and infra/lock/*.in's ranges, keeping every pin they
# still allow, and prints what changed. `make lock UPGRADE=1` takes the newest allowed versions instead.
lock: $(TOOLS_STAMP)
	@$(LOCKS)/lock.sh $(if $(UPGRADE),--upgrade)

# The newest versions the inputs allow, resolved into $(UPGRADE_DIR) (the committed locks untouched),
# installed into throwaway venvs and run against the fast tests, on servers of their own (ports + 100).
upgrade-check: $(TOOLS_STAMP)
	@rm -rf $(UPGRADE_DIR) && mkdir -p $(UPGRADE_DIR)
	@$(LOCKS)/lock.sh --upgrade $(UPGRADE_DIR)
	@$(call sync_venv,$(UPGRADE_DIR)/venv,$(UPGRADE_DIR)/project.txt)
	@$(UV) pip install --quiet --python $(UPGRADE_DIR)/venv/bin/python --no-deps --no-build-isolation -e .
	@$(call sync_venv,$(UPGRADE_DIR)/ls-venv,$(UPGRADE_DIR)/label-studio.txt)
	@status=0; FLYWHEEL_TEST_WORKSPACE=$(CURDIR)/$(UPGRADE_DIR)/workspace FLYWHEEL_TEST_PORT_OFFSET=100 \
		FLYWHEEL_TEST_LOCKS=$(UPGRADE_DIR) FLYWHEEL_TEST_LS_VENV=$(CURDIR)/$(UPGRADE_DIR)/ls-venv \
		FLYWHEEL_LABEL_STUDIO__EXECUTABLE=$(CURDIR)/$(UPGRADE_DIR)/ls-venv/bin/label-studio \
		$(UPGRADE_DIR)/venv/bin/python -m pytest -q $(PYTEST_PARALLEL) $(FAST_TESTS) || status=$$?; \
	FLYWHEEL_WORKSPACE=$(CURDIR)/$(UPGRADE_DIR)/workspace FLYWHEEL_LABEL_STUDIO__PORT=18180 \
		FLYWHEEL_MLFLOW__PORT=15100 FLYWHEEL_PREFECT__PORT=14300 $(UPGRADE_DIR)/venv/bin/python -m flywheel.devservers.services stop; \
	if [ $$status = 0 ]; then echo "upgrade-check: the newest allowed versions pass (make lock UPGRADE=1 takes them)"; \
	else echo "upgrade-check: the newest allowed versions FAIL the tests above; the committed locks are untouched" >&2; \
	fi; exit $$status

fashion-mnist:
	@if ! dpkg -s dataset-fashion-mnist >/dev/null 2>&1; then \
		sudo=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		echo "installing apt package dataset-fashion-mnist"; \
		$$sudo apt-get update -qq && $$sudo apt-get install -y -qq dataset-fashion-mnist; \
	fi

# Debian's PostgreSQL server binaries (initdb, pg_ctl): flywheel.devservers.postgres runs its own cluster with them.
postgresql:
	@if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then \
		sudo=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		echo "installing apt package postgresql"; \
		$$sudo apt-get update -qq && $$sudo apt-get install -y -qq postgresql; \
	fi

# The servers, and the deployments' worker when `make deploy` set this workspace up with one.
services: setup
	@$(SERVICES) start
	@.venv/bin/python -m flows.worker restore

# Stops the demo's servers and the test servers, only those started from these workspaces.
stop:
	@if [ -x .venv/bin/python ]; then \
		.venv/bin/python -m flows.worker stop; \
		$(SERVICES) stop; \
		$(TEST_ENV) $(SERVICES) stop; \
		$(PG_TEST_ENV) $(SERVICES) stop; \
		$(PG_TEST_ENV) .venv/bin/python -m flywheel.devservers.postgres stop; \
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

# First the code checks (lint, audit), then the tests: the pytest session fixture starts (or reuses) the test
# servers itself, and the PostgreSQL pass repeats the integration tests that use the catalog, MLflow and
# Prefect with all three on PostgreSQL. Every step always runs; any failure fails the target.
test: setup
	@status=0; \
	$(MAKE) --no-print-directory lint || status=$$?; \
	$(MAKE) --no-print-directory audit || status=$$?; \
	echo "== pytest"; \
	.venv/bin/python -m pytest -q $(PYTEST_PARALLEL) --durations=20 || status=$$?; \
	echo "== PostgreSQL pass: FLYWHEEL_TEST_DB=postgres pytest $(PG_TESTS)"; \
	FLYWHEEL_TEST_DB=postgres .venv/bin/python -m pytest -q $(PYTEST_PARALLEL) $(PG_TESTS) || status=$$?; \
	exit $$status

# ruff (lint and format) on everything, mypy as configured in pyproject.toml (strict on flywheel/).
lint: $(VENV_STAMP)
	@echo "== ruff check, ruff format --check, mypy"
	@status=0; \
	.venv/bin/ruff check --quiet . || status=$$?; \
	.venv/bin/ruff format --check --quiet . || status=$$?; \
	.venv/bin/mypy || status=$$?; \
	exit $$status

# Known vulnerabilities in the locked packages (pip-audit, PyPI's advisory data): fails on one a newer release
# fixes; one with no fix must be waived in infra/audit.py with the reason it does not reach us (and listed in the
# README). AUDIT_STRICT=1 also fails when PyPI's vulnerability data cannot be reached from this machine.
audit: $(VENV_STAMP)
	@echo "== pip-audit of the lock files"
	@.venv/bin/python infra/audit.py $(if $(AUDIT_STRICT),--strict) $(LOCKS)/project.txt $(LOCKS)/label-studio.txt \
		$(LOCKS)/tools.txt

# Removes the workspaces (data, logs, servers' state), never the venvs.
clean: stop
	rm -rf .flywheel $(TEST_WS) $(LOGS)
