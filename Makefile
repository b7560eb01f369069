# Front door of migrated. Every target sets up what it needs from scratch.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SOURCES := pyproject.toml setup.py $(wildcard ext/*.pyx ext/*.h)

.PHONY: all demo test bench clean

all: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# Installs the project with its test extra; builds the extension in place so
# the package imports from the work tree.
$(STAMP): $(PY) $(SOURCES)
	$(PY) -m pip install --quiet --upgrade "cython>=3.0" "setuptools>=70" wheel
	$(PY) -m pip install --quiet --no-build-isolation -e ".[test]"
	$(PY) setup.py --quiet build_ext --inplace
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m migrated._tools.demo

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) -m migrated bench

clean:
	rm -rf $(VENV) build *.egg-info migrated/*.so ext/_core.c .pytest_cache .hypothesis demo-out
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
