# The two newcomer commands: `make demo` and `make test`. Both set up .venv themselves.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q --disable-pip-version-check
# A CPU build of torch is all the demo and the tests need; the package itself accepts a range.
TORCH ?= torch==2.13.0

.PHONY: demo test install install-dev lint bench clean

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

test: install-dev
	$(PY) -m pytest

lint: install-dev
	$(VENV)/bin/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache
