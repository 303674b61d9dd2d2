# Two commands on a fresh machine:  make demo  (the main job)   make test  (the test suite)
# Both create .venv and install what is needed first.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch and torchvision must be a pair that imports together (torchvision's compiled ops are built
# for one torch). This pair is what the project is developed and tested with; pip takes both from the
# local wheel cache where there is one (a CUDA build: about 5.5 GB in the venv, about 1 minute here).
# Override (e.g. TORCH_SPEC="torch==2.9.1 torchvision==0.24.1") for another pair.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1

.PHONY: demo test test-fast lint install clean arch-table

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

install: $(VENV)/.installed

# The paper's MNIST classifier, layer max1: every class's core units and holding rate.
# MNIST comes from DATA_ROOT (make demo DATA_ROOT=/path/to/folder-with-MNIST) / $$COREUNITS_DATA,
# a download, or the bundled 2,000-digit sample (whose results differ from the full data: it says so).
demo: $(VENV)/.installed
	$(PY) -m coreunits.cli demo $(if $(DATA_ROOT),--data-root $(DATA_ROOT),)

# Static checks, run first by `make test` (hence by CI's .ci/run): ruff, then mypy on the package.
lint: $(VENV)/.installed
	$(VENV)/bin/ruff check src tests
	$(VENV)/bin/mypy src

# The whole suite (slow tests included; see README for measured times), on PYTEST_WORKERS processes of one
# thread each (pytest-xdist; a file's tests stay in one process, so its module fixtures are built once): most
# tests are bound by Python overhead, not arithmetic, and two one-thread processes on 2 cores took 494 s
# where one two-thread process took 676 s. PYTEST_WORKERS=0 runs in this process.
# pytest exits 5 when it collects nothing: turn that into a loud failure.
PYTEST_WORKERS ?= 2
test: lint
	@OMP_NUM_THREADS=1 $(PY) -m pytest -q $(if $(filter 0,$(PYTEST_WORKERS)),,-n $(PYTEST_WORKERS) --dist loadfile) $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "ERROR: pytest collected no tests" >&2; exit 1; fi; exit $$rc

test-fast: PYTEST_ARGS = -m "not slow"
test-fast: test

# README's table of the architectures tested: runs tests/test_real_architectures.py (slow cases
# included, a few minutes on 2 cores), keeps its rows in results/architectures.jsonl and rewrites the
# block between README's <!-- architectures:start/end --> markers (prints the table when they are missing).
arch-table: $(VENV)/.installed
	$(PY) scripts/architecture_table.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info src/*.egg-info
