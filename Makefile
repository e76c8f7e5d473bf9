# capt: build the book, run the tests, start JupyterLab.
#
#   make book    create .venv if needed, pretrain MiniCLIP, execute the book's notebooks,
#                build runs/book/_build/html/index.html
#   make test    create .venv if needed, run the whole test suite
#   make runs    execute every notebook for each of DATASETS x SEEDS into runs/
#   make lab     start JupyterLab in the project's environment
#   make clean   delete runs/ (the environment .venv stays)

SHELL := /bin/bash
.DEFAULT_GOAL := help

# Interpreter that creates the virtual environment, and the environment's folder.
PYTHON3 ?= python3
VENV ?= .venv
VENV_PYTHON := $(VENV)/bin/python
CAPT := $(VENV)/bin/capt
# Written last by the environment step, so it exists only when every install succeeded.
STAMP := $(VENV)/.capt-installed
KERNELSPEC := $(VENV)/share/jupyter/kernels/capt/kernel.json
# Installed first and on their own, so pip settles on exactly these builds (from a local
# wheel index where pip is configured with one). Installed together with other packages,
# the resolver may pull a different build.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

RUNS_DIR ?= runs
PYTEST_ARGS ?=
# Extra options of `capt book`, e.g. BOOK_ARGS=--force to execute every notebook again.
BOOK_ARGS ?=
PRETRAIN_RECIPE ?= default
PRETRAIN_SEED ?= 0
DATASETS ?= fashion_mnist
SEEDS ?= 1 2 3
NOTEBOOKS ?= $(sort $(wildcard notebooks/*.ipynb))

.PHONY: help env kernel book test runs pretrain lab clean

help:
	@sed -n '1,9p' Makefile | sed 's/^# \{0,1\}//'

env: $(STAMP) $(KERNELSPEC)

$(STAMP): pyproject.toml
	@test -x $(VENV_PYTHON) || { echo "creating $(VENV) with $(PYTHON3)"; $(PYTHON3) -m venv $(VENV); }
	$(VENV_PYTHON) -m pip install $(TORCH_PINS)
	$(VENV_PYTHON) -m pip install -e '.[test]'
	touch $@

# The kernelspec lives inside the environment (python -m ipykernel install --sys-prefix),
# where papermill and JupyterLab started from .venv find it.
$(KERNELSPEC): $(STAMP)
	$(CAPT) kernel
	@touch $@

kernel: $(STAMP)
	$(CAPT) kernel

# Notebooks executed from the book, the runs or JupyterLab share one cache, wherever
# their kernel's working directory is.
book runs pretrain lab: export CAPT_CACHE_DIR ?= $(CURDIR)/$(RUNS_DIR)/cache

pretrain: $(STAMP)
	$(CAPT) pretrain --recipe $(PRETRAIN_RECIPE) --seed $(PRETRAIN_SEED)

# capt skips notebook runs that are up to date (same parameters, notebook and capt_lib).
book: $(STAMP) $(KERNELSPEC) pretrain
	$(CAPT) book --runs-dir $(RUNS_DIR) $(BOOK_ARGS)

runs: $(STAMP) $(KERNELSPEC) pretrain
	@test -n "$(NOTEBOOKS)" || { echo "make runs: no notebooks in notebooks/" >&2; exit 1; }
	@for notebook in $(NOTEBOOKS); do \
	  echo "$(CAPT) run $$notebook --dataset $(DATASETS) --seed $(SEEDS) --runs-dir $(RUNS_DIR)"; \
	  $(CAPT) run "$$notebook" --dataset $(DATASETS) --seed $(SEEDS) --runs-dir $(RUNS_DIR) || exit $$?; \
	done

# pytest exits with 5 when it collects no tests, and that fails here with a message.
test: $(STAMP) $(KERNELSPEC)
	@status=0; $(VENV_PYTHON) -m pytest $(PYTEST_ARGS) || status=$$?; \
	if [ $$status -eq 5 ]; then echo "make test: pytest collected no tests" >&2; fi; \
	exit $$status

lab: $(STAMP) $(KERNELSPEC)
	$(VENV)/bin/jupyter lab

clean:
	@test -n "$(RUNS_DIR)" && test "$(RUNS_DIR)" != "/" || { echo "make clean: refusing RUNS_DIR='$(RUNS_DIR)'" >&2; exit 1; }
	rm -rf $(RUNS_DIR)
