# biomask — the two set-up commands are `make run` (main job) and `make test` (tests).
# Both create or update the virtualenv in $(VENV) themselves.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.biomask-installed
# torch is pinned (constraints.txt) and installed first: an unpinned torch would pull a multi-GB CUDA build.
TORCH_PIN := $(shell grep -E '^torch==' constraints.txt)
# Which build of that torch: empty = pip's configured index (PyPI's Linux wheel is a CUDA build);
# a CPU laptop: make venv TORCH_INDEX=https://download.pytorch.org/whl/cpu; a GPU: .../whl/cu126, the
# CUDA the driver supports (docs/install.md). Either satisfies the pin (2.13.0+cpu matches ==2.13.0).
TORCH_INDEX ?=

# No DS_ACCELERATOR here: biomask picks the GPU when torch sees one and exports the choice, so
# DeepSpeed and torch agree (set DS_ACCELERATOR=cpu to train on the CPU anyway).
export PYTHONUNBUFFERED := 1

.PHONY: venv run test lint bench clean help

help:
	@echo "make run    - set up the venv, then run the main job on the built-in real data"
	@echo "make test   - set up the venv, then lint (ruff) and run the test suite"
	@echo "make bench  - benchmarks (ratios against peer implementations, one run)"

$(STAMP): pyproject.toml setup.py constraints.txt
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { \
	  echo "biomask needs Python >= 3.11 (the pinned numpy/scipy/anndata/scikit-learn do); $(PYTHON) is $$($(PYTHON) -V 2>&1)."; \
	  echo "Run: make PYTHON=python3.11 ...  (or see docs/install.md: conda env create -f environment.yml)"; exit 1; }
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade "pip>=24"
	$(BIN)/python -m pip install -q $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH_PIN)"
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev,bench,mlflow]"
	@touch $@

venv: $(STAMP)

run: $(STAMP)
	$(BIN)/python -m biomask main $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check biomask data_prep pipelines tests benchmarks
	$(BIN)/ruff format --check biomask data_prep pipelines tests benchmarks

# Two pytest processes (pytest-xdist): the tests are mostly single-threaded, so two cores run the
# suite in about half the time; the SLURM tests stay together on one (they share one cluster).
# TEST_WORKERS=0 runs it in one process (a debugger, -x, -k on a few tests).
TEST_WORKERS ?= 2
test: lint
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadgroup $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python -m benchmarks $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
