# Front door of migrated. Every target sets up what it needs from scratch.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SOURCES := pyproject.toml setup.py $(wildcard ext/*.pyx ext/*.pxi ext/*.h)

.PHONY: all demo test test-fast check bench fuzz clean

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

# Coverage-guided fuzzing (atheris) of every parser a peer reaches, FUZZ_SECONDS
# per target; then everything it found, and the corpus, replayed through an
# extension built with AddressSanitizer and UBSan (gcc's sanitizers and
# atheris's coverage cannot share a process, so they take turns). Inputs
# that fail land in tests/fuzz/corpus/TARGET/, which `make test` replays.
FUZZ_SECONDS ?= 120
FUZZ_TARGETS := stream xbzrle records control
FUZZ_PKG := build/fuzz/pkg
SANITIZE := -fsanitize=address,undefined -fno-omit-frame-pointer
fuzz: $(STAMP)
	for t in $(FUZZ_TARGETS); do \
	  (cd tests && ../$(PY) fuzz_run.py $$t -max_total_time=$(FUZZ_SECONDS) -print_final_stats=1) || exit 1; \
	done
	rm -rf $(FUZZ_PKG) && mkdir -p $(FUZZ_PKG)
	cp -r migrated $(FUZZ_PKG)/ && rm -f $(FUZZ_PKG)/migrated/*.so
	CFLAGS="$(SANITIZE) -g -O1" LDFLAGS="$(SANITIZE)" $(PY) setup.py --quiet build_ext \
	  --build-lib $(FUZZ_PKG) --build-temp build/fuzz/tmp --force
	ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
	  LD_PRELOAD="$$(gcc -print-file-name=libasan.so) $$(gcc -print-file-name=libubsan.so)" \
	  PYTHONPATH=$(FUZZ_PKG):tests $(PY) tests/fuzz_targets.py build/fuzz/corpus tests/fuzz/corpus

clean:
	rm -rf $(VENV) build *.egg-info migrated/*.so ext/_core.c .pytest_cache .hypothesis .ruff_cache .mypy_cache demo-out
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
