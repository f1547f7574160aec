# `make demo` and `make test` set themselves up on a fresh machine (Python 3.11 + package index).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-slurm gpu-check lint clean paper bench

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

# The workflow through a real (two emulated nodes) Slurm started and stopped by the tests:
# root on Debian/Ubuntu, installs slurm-wlm and munge with apt-get when missing; ~11 minutes.
# Run it before every change to frontier/ or tests/slurm/profile/. Its own --basetemp: a
# concurrent pytest would otherwise prune the running jobs' folders (it keeps the last 3).
test-slurm: $(STAMP)
	mkdir -p .pytest_cache  # pytest creates --basetemp but not its parent (a fresh clone has none)
	DOWNSCALER_SLURM_TESTS=1 PATH="$(CURDIR)/$(BIN):$$PATH" \
		$(BIN)/pytest --basetemp=.pytest_cache/slurm-tmp tests/test_slurm.py \
		tests/test_frontier_profile.py

# Parity over NCCL/RCCL, a bf16 + flash-SDPA step and MFU on this machine's GPUs, as one table;
# says so and exits 0 without a GPU.
gpu-check: $(STAMP)
	$(BIN)/python benchmarks/gpu_check.py

lint: $(STAMP)
	$(BIN)/ruff check .
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/snakemake --lint
	$(BIN)/snakefmt --check Snakefile workflow/rules

clean:
	rm -rf results/raw results/pairs results/tiles results/model results/downscaled \
		results/evaluation results/benchmarks results/paper logs .snakemake
