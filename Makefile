# Two commands a learner needs: `make lab` and `make test`. Each creates .venv if missing.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.moe_lab-installed
JOBS ?= 2
# Notebooks run in parallel workers; one BLAS thread each keeps 2 cores from thrashing.
TEST_ENV := MOE_LAB_PROFILE=ci OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 MPLBACKEND=Agg
# Profile for `make site`, `make time` and `make study`: default (a 2-core laptop) or ci (small and fast).
PROFILE ?= default

.PHONY: install lab test unit notebooks site student time check bench bench-hf bench-compressed study lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e '.[course,hf,dev]'
	touch $(STAMP)

install: $(STAMP)

lab: install
	$(BIN)/jupyter lab notebooks/

# The unit tests and every notebook executed as Restart & Run All does (tests/test_run_all.py, nbclient).
test: install
	$(TEST_ENV) $(BIN)/python -m pytest -n $(JOBS) --dist loadfile tests

unit: install
	$(TEST_ENV) $(BIN)/python -m pytest -n $(JOBS) tests --ignore=tests/test_run_all.py

notebooks: install
	$(TEST_ENV) $(BIN)/python -m pytest -n $(JOBS) --dist load tests/test_run_all.py::test_notebook_runs_all_and_renders

# The course as a static HTML site in site/ (executed copies; notebooks/ stays clean): make site PROFILE=ci
site: install
	$(BIN)/python tools/course.py site --profile $(PROFILE) --out site

# Student copies without the solution cells, in student/.
student: install
	$(BIN)/python tools/course.py student --out student

# Seconds per notebook, each executed alone, as a markdown table: make time PROFILE=default
time: install
	$(BIN)/python tools/course.py time --profile $(PROFILE)

check: install
	$(BIN)/python tools/course.py check

bench: install
	$(BIN)/python bench/dispatch.py

bench-hf: install
	$(BIN)/python bench/hf_dispatch.py
	$(BIN)/python bench/hf_deepseek.py

bench-compressed: install
	$(BIN)/python bench/compressed.py

# A headless compression study; override TASK, RECIPE, PROFILE or OUT on the command line.
TASK ?= synthetic
RECIPE ?= prune-experts=0.25,lowrank=0.5,int8,finetune=1
OUT ?= study-out
study: install
	$(BIN)/python -m moe_lab study --task $(TASK) --recipe $(RECIPE) --profile $(PROFILE) --out $(OUT)

lint: install
	$(BIN)/ruff check moe_lab tests bench tools

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache site student
