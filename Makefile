# Thin targets; the logic lives in cxrlib (python -m cxrlib ...).
# `make demo` and `make test` create .venv and install the project on first use.
PYTHON_BOOT ?= $(shell command -v python3.11 || command -v python3)
VENV        ?= .venv
PY          := $(VENV)/bin/python
STAMP       := $(VENV)/.installed
RUN_DIR     ?= runs/phantom-default
# folder holding the realdata recipe's sources (covid-chestxray/, nih-cxr14-sample/, covid19-radiography/)
DATA        ?= ../shared/realdata
DATA_ROOT   ?= $(DATA)
# Jupyter refuses to run as root without this flag (containers, CI machines).
LAB_ARGS    ?= $(if $(filter 0,$(shell id -u)),--allow-root,)

.PHONY: help venv demo test quick real lab bench clean-runs

help:
	@echo "make demo   - install into $(VENV) and run every notebook on the phantom data"
	@echo "make test   - install into $(VENV) and run the test suite (includes the notebook smoke run)"
	@echo "make lab    - open JupyterLab on notebooks/"
	@echo "make quick  - the CI-sized pipeline run (runs/phantom-quick)"
	@echo "make real   - every notebook on real data (realdata recipe; make real DATA=path, default $(DATA))"
	@echo "make bench  - run the benchmarks (writes benchmarks/results/*.json)"

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON_BOOT) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) -m cxrlib pipeline --dataset phantom --profile default --run-dir $(RUN_DIR)

quick: $(STAMP)
	$(PY) -m cxrlib pipeline --dataset phantom --profile quick --run-dir runs/phantom-quick

real: $(STAMP)
	$(PY) -m cxrlib pipeline --dataset realdata --profile real-cpu --run-dir runs/realdata-real-cpu --param DATA_ROOT=$(DATA_ROOT) --param SEG_DATA=$(DATA_ROOT)/covid19-radiography

test: $(STAMP)
	$(PY) -m pytest

lab: $(STAMP)
	$(VENV)/bin/jupyter lab $(LAB_ARGS) notebooks/

bench: $(STAMP)
	$(PY) benchmarks/run_all.py

clean-runs:
	rm -rf runs/
