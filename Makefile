# `make demo` and `make test` set themselves up on a fresh machine (Python 3.11 + package index).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint clean paper bench

$(STAMP): envs/requirements.txt envs/requirements-test.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade --quiet pip
	$(BIN)/pip install --quiet -r envs/requirements-test.txt
	$(BIN)/pip install --quiet --no-deps -e .
	touch $(STAMP)

# Rules run `python -m downscaler.cli ...`: the environment's python must come first on PATH.
demo: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/snakemake --cores all

# The papers' figures and tables (results/paper/) and the paper-size benchmarks behind them.
paper: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/snakemake --cores all paper

bench: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/snakemake --cores all bench

test: $(STAMP)
	$(BIN)/pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/snakemake --lint
	$(BIN)/snakefmt --check Snakefile workflow/rules

clean:
	rm -rf results/raw results/pairs results/tiles results/model results/downscaled \
		results/evaluation results/benchmarks logs .snakemake
