# Two entry points do all set-up on a fresh machine (Python 3.11):
#   make demo   - the whole loop on the embedded default
#   make test   - the test suite
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: demo test setup compile bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

setup: $(BIN)/.installed

demo: setup
	$(BIN)/driftloop demo

test: setup
	$(BIN)/python -m pytest -q

compile: setup
	$(BIN)/driftloop compile -c examples/demo.yaml -o compiled

clean:
	rm -rf .driftloop compiled
