# Two commands do everything on a fresh machine: `make demo` and `make test`.
# Each creates .venv if missing and installs the package with the versions pinned in constraints.txt.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test

demo: $(VENV)/.installed
	$(PY) -m lpl_jax.demo --workdir=runs/demo

# Tests marked `slow` (train-step compilations, multi-device and multi-process runs, float64 finite differences) are
# left to CI (.ci/run), which runs them after this target.
test: $(VENV)/.installed-test
	$(VENV)/bin/ruff check lpl_jax tests benchmarks configs
	$(VENV)/bin/ruff format --check lpl_jax tests benchmarks configs
	$(PY) -m pytest -q -n 2 --dist loadfile -m "not slow" --durations=15 tests

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(VENV)/.installed: $(VENV)/bin/python setup.py constraints.txt
	$(PY) -m pip install --quiet -c constraints.txt -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/bin/python setup.py constraints.txt
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $@ $(VENV)/.installed
