# merflow: `make demo` runs the whole job on the built-in demo corpus; `make test` runs the suite.
# Both set up everything first (system packages where possible, the virtualenv, the project).
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_OUT ?= demo-run
PYTEST_ARGS ?=

.PHONY: setup system-deps demo test lint format bench clean

setup: system-deps $(VENV)/.installed

system-deps:
	@bash .ci/system-deps.sh

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet --no-cache-dir -e '.[dev]'
	@touch $@

demo: setup
	HF_HUB_OFFLINE=1 $(VENV)/bin/merflow demo --out $(DEMO_OUT)

test: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(DEMO_OUT) .pytest_cache
