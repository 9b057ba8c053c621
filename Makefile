# The two README commands: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test test-slow test-all bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed-base: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[test]'
	touch $@ $(VENV)/.installed-base

demo: $(VENV)/.installed-base
	JAX_PLATFORMS=cpu $(BIN)/icot demo

test: $(VENV)/.installed-test
	JAX_PLATFORMS=cpu $(BIN)/python -m pytest -q

test-slow: $(VENV)/.installed-test
	JAX_PLATFORMS=cpu $(BIN)/python -m pytest -q -m slow

test-all: $(VENV)/.installed-test
	JAX_PLATFORMS=cpu $(BIN)/python -m pytest -q -m ''

clean:
	rm -rf $(VENV) runs
