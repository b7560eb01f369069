# Front door of migrated. Every target sets up what it needs from scratch.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SOURCES := pyproject.toml setup.py $(wildcard ext/*.pyx ext/*.pxi ext/*.h)

.PHONY: all demo test test-fast check bench clean

all: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# Installs the project with its test and check extras; builds the extension
# in place so the package imports from the work tree.
$(STAMP): $(PY) $(SOURCES)
	$(PY) -m pip install --quiet --upgrade "cython>=3.0" "setuptools>=77" wheel
	$(PY) -m pip install --quiet --no-build-isolation -e ".[test,check]"
	$(PY) setup.py --quiet build_ext --inplace
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m migrated._tools.demo

# the whole suite: unit, integration (real daemons on loopback) and slow lanes
test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

# the unit lane alone: no daemon, child process or socket; seconds
test-fast: $(STAMP)
	$(PY) -m pytest -m "not integration and not slow" $(PYTEST_ARGS)

# the static gate: lint, format and types
check: $(STAMP)
	$(PY) -m ruff check migrated tests
	$(PY) -m ruff format --check migrated tests
	$(PY) -m mypy

bench: $(STAMP)
	$(PY) -m migrated bench

clean:
	rm -rf $(VENV) build *.egg-info migrated/*.so ext/_core.c .pytest_cache .hypothesis .ruff_cache .mypy_cache demo-out
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
