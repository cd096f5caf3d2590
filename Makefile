# Two commands a learner needs: `make lab` and `make test`. Each creates .venv if missing.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.moe_lab-installed
JOBS ?= 2
# Notebooks run in parallel workers; one BLAS thread each keeps 2 cores from thrashing.
TEST_ENV := MOE_LAB_PROFILE=ci OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 MPLBACKEND=Agg

.PHONY: install lab test unit notebooks bench bench-hf study lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e '.[course,hf,dev]'
	touch $(STAMP)

install: $(STAMP)

lab: install
	$(BIN)/jupyter lab notebooks/

test: install
	$(TEST_ENV) $(BIN)/python -m pytest -n $(JOBS) --dist loadfile --nbval-lax --nbval-current-env tests notebooks

unit: install
	$(TEST_ENV) $(BIN)/python -m pytest -n $(JOBS) tests

notebooks: install
	$(TEST_ENV) $(BIN)/python -m pytest -n $(JOBS) --dist loadfile --nbval-lax --nbval-current-env notebooks

bench: install
	$(BIN)/python bench/dispatch.py

bench-hf: install
	$(BIN)/python bench/hf_dispatch.py
	$(BIN)/python bench/hf_deepseek.py

# A headless compression study; override TASK, RECIPE, PROFILE or OUT on the command line.
TASK ?= synthetic
RECIPE ?= prune-experts=0.25,lowrank=0.5,int8,finetune=1
PROFILE ?= default
OUT ?= study-out
study: install
	$(BIN)/python -m moe_lab study --task $(TASK) --recipe $(RECIPE) --profile $(PROFILE) --out $(OUT)

lint: install
	$(BIN)/ruff check moe_lab tests bench

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache
