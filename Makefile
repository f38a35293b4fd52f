# The two commands of the README: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run test

# A stamp of our own: scripts/run.sh may have made the venv (without the test packages).
$(VENV)/.dev-installed: requirements.txt requirements-dev.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements-dev.txt
	touch $@

# scripts/run.sh makes its own venv: the first run installs and starts a real local model.
run:
	scripts/run.sh

test: $(VENV)/.dev-installed
	$(BIN)/python -m pytest
