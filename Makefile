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

.PHONY: setup browser demo test screenshots clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# The CPU build of torch first, so nothing below pulls a CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

setup: $(BIN)/.installed

# The browser tests drive Debian's chromium through Selenium (tests/web/).
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; elif sudo -n true 2>/dev/null; then SUDO="sudo -n"; \
	  else echo "make: the browser tests need chromium and chromium-driver: sudo apt-get install chromium chromium-driver" >&2; exit 1; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null; }

demo: setup
	$(BIN)/fedsynth simulate simulations/demo.yaml

test: setup browser
	$(BIN)/python -m pytest -q

# Re-take the screenshots in docs/img/ from the browser tests.
screenshots: setup browser
	FEDSYNTH_SCREENSHOTS=$(abspath docs/img) $(BIN)/python -m pytest -q tests/web

clean:
	rm -rf $(VENV) runs .pytest_cache
