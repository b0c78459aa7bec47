# `make run`: install and train the main job on the embedded corpus. `make test`: install with the dev
# extra and run the whole suite; `make test-fast`: the unit tests only (the `slow` end-to-end tests, which
# train or start jaxtrain processes, left out). All create .venv with the python3 on PATH (3.10+; tested on 3.11).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
CONFIG ?= configs/stackwise.py
ARGS ?=

.PHONY: run test test-fast lint bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed pyproject.toml
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

run: $(VENV)/.installed
	$(PY) -m jaxtrain.main --config=$(CONFIG) $(ARGS)

test: $(VENV)/.installed-dev
	$(PY) -m pytest -q -n 2 --dist loadfile tests

test-fast: $(VENV)/.installed-dev
	$(PY) -m pytest -q -n 2 --dist loadfile -m 'not slow' tests

lint: $(VENV)/.installed-dev
	$(VENV)/bin/ruff check jaxtrain tests configs benchmarks

bench: $(VENV)/.installed-dev
	$(PY) benchmarks/run.py $(ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
