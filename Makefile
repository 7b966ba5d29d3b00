# Two commands for a newcomer (see README.md):
#   make demo   - set up .venv and run the demo federation
#   make test   - set up .venv and run the test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The real data is read in place from ../shared/data, never copied.
export FEDSYNTH_DATA_DIR ?= $(abspath ../shared/data)
# Otherwise Flower installs the app's dependencies at run time (a CUDA torch).
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION := 1

.PHONY: setup demo test clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# The CPU build of torch first, so nothing below pulls a CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

setup: $(BIN)/.installed

demo: setup
	$(BIN)/fedsynth simulate simulations/demo.yaml

test: setup
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache
