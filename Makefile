# byok-credits: every target installs what it needs first, so each works on a fresh machine.
SHELL := /bin/bash
PY    := .venv/bin/python
STAMP := .venv/.installed

.PHONY: install lock lint schema up down status run test unit integration e2e fuzz bench demo asyncapi migrate clean

install: $(STAMP)
# The exact versions (with their hashes) come from requirements.lock, so two installs are the same;
# then the project itself, without letting pip resolve anything else.
$(STAMP): pyproject.toml requirements.lock
	@test -x $(PY) || python3 -m venv .venv
	@$(PY) -m pip install -q -U pip
	@$(PY) -m pip install -q -r requirements.lock
	@$(PY) -m pip install -q -e . --no-deps
	@touch $(STAMP)

lock: install         ## regenerate requirements.lock after changing a dependency in pyproject.toml (uses uv, fetched into .venv)
	@$(PY) -m pip install -q "uv==0.13.9"
	@.venv/bin/uv pip compile pyproject.toml --extra dev --universal --generate-hashes --python-version 3.11 -q -o requirements.lock

lint: install         ## ruff (lint and format), the import rule between packages, and mypy --strict over schemas, billing, providers, services and infra (.pre-commit-config.yaml runs the same)
	@.venv/bin/ruff check .
	@.venv/bin/ruff format --check .
	@.venv/bin/lint-imports --no-cache
	@.venv/bin/mypy --strict schemas billing providers services infra

up: install           ## start Kafka, PostgreSQL and every service in the background
	@bash infra/stack.sh up

down:                 ## stop everything `up` started
	@bash infra/stack.sh down

status:
	@bash infra/stack.sh status

run: install          ## start everything, print the page's address, stay until Ctrl-C
	@bash infra/stack.sh run

migrate: install
	@bash infra/postgres.sh up && DATABASE_URL=$$(bash infra/postgres.sh url) $(PY) -m migrations

schema: install       ## regenerate migrations/schema.sql (the schema the migrations build) after adding a migration
	@bash infra/postgres.sh up && DATABASE_URL=$$(bash infra/postgres.sh url) $(PY) -m migrations.schema

test: install         ## the whole suite on the real broker and database
	@bash infra/kafka.sh up && bash infra/postgres.sh up
	@$(PY) -m pytest tests $(PYTEST_ARGS)

unit: install
	@$(PY) -m pytest tests/unit $(PYTEST_ARGS)

integration: install
	@bash infra/kafka.sh up && bash infra/postgres.sh up
	@$(PY) -m pytest tests/integration $(PYTEST_ARGS)

e2e: install
	@bash infra/kafka.sh up && bash infra/postgres.sh up
	@$(PY) -m pytest tests/e2e $(PYTEST_ARGS)

fuzz: install         ## schemathesis over the chat and credit APIs (live processes): no 5xx, no schema violation
	@bash infra/kafka.sh up && bash infra/postgres.sh up
	@$(PY) -m pytest tests/e2e/test_api_fuzz.py -s $(PYTEST_ARGS)

bench: install        ## benchmarks, each figure beside its baseline from the same run (starts and then stops the broker and database unless they run)
	@$(PY) -m bench $(BENCH_ARGS)

demo: install         ## scripted scenario against the live stack; exit 0 only if balances are right
	@bash infra/stack.sh up
	@$(PY) -m scripts.demo

asyncapi: install     ## regenerate docs/asyncapi.json from the code
	@.venv/bin/faststream docs gen schemas.asyncapi:app --out docs/asyncapi.json

clean: down
	rm -rf .run
