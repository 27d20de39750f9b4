# The two newcomer commands: `make demo` and `make test`. Both set up .venv themselves.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q --disable-pip-version-check
# A CPU build of torch is all the demo and the tests need; the package itself accepts a range.
TORCH ?= torch==2.13.0

.PHONY: demo test test-browser install install-dev lint bench clean

$(VENV)/.base: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) $(TORCH)
	$(PIP) -e .
	touch $@

$(VENV)/.dev: $(VENV)/.base
	$(PIP) -e '.[dev]'
	touch $@

install: $(VENV)/.base
install-dev: $(VENV)/.dev

demo: install
	printf 'ROMEO:\n' | $(VENV)/bin/ventoux generate --max-tokens 200 --temperature 0.8 --seed 1 -

# The browser test (tests/test_browser.py) drives Debian's chromium: Playwright cannot download its own
# browsers here. It is installed with apt-get when missing (as root, or through sudo); elsewhere point
# CHROMIUM at any Chromium or Chrome binary.
CHROMIUM ?= /usr/bin/chromium
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)

$(CHROMIUM):
	$(SUDO) apt-get update
	$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium

test: install-dev $(CHROMIUM)
	VENTOUX_CHROMIUM=$(CHROMIUM) $(PY) -m pytest

test-browser: install-dev $(CHROMIUM)
	VENTOUX_CHROMIUM=$(CHROMIUM) $(PY) -m pytest tests/test_browser.py

lint: install-dev
	$(VENV)/bin/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache
