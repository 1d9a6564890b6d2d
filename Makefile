# Thin targets; the logic lives in cxrlib (python -m cxrlib ...).
# `make demo` and `make test` create .venv and install the project on first use.
PYTHON_BOOT ?= $(shell command -v python3.11 || command -v python3)
VENV        ?= .venv
PY          := $(VENV)/bin/python
STAMP       := $(VENV)/.installed
RUN_DIR     ?= runs/phantom-default
# folder holding the realdata recipe's sources (covid-chestxray/, nih-cxr14-sample/, covid19-radiography/,
# covid-segmentations/)
DATA        ?= ../shared/realdata
DATA_ROOT   ?= $(DATA)
# Jupyter refuses to run as root without this flag (containers, CI machines).
LAB_ARGS    ?= $(if $(filter 0,$(shell id -u)),--allow-root,)

.PHONY: help venv demo test quick real real-external lab bench clean-runs

help:
	@echo "make demo   - install into $(VENV) and run every notebook on the phantom data"
	@echo "make test   - install into $(VENV) and run the test suite (includes the notebook smoke run)"
	@echo "make lab    - open JupyterLab on notebooks/"
	@echo "make quick  - the CI-sized pipeline run (runs/phantom-quick)"
	@echo "make real   - every notebook on real data (realdata recipe; make real DATA=path, default $(DATA))"
	@echo "make real-external - notebooks 01 + 04 only, real-only classifiers, on designs (a) and (b) with the"
	@echo "               cxnet_covid external cohort: internal / external / floor tables"
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
	$(PY) -m cxrlib pipeline --dataset realdata --profile real-cpu --run-dir runs/realdata-real-cpu --param DATA_ROOT=$(DATA_ROOT) --param SEG_DATA=$(DATA_ROOT)/covid19-radiography --param EXPERT_SEG_DATA=$(DATA_ROOT)/covid-segmentations --param EXTERNAL=cxnet_covid

# design (a): realdata development, COVID-CXNet external; design (b): COVID-19 vs other pneumonias of one
# collection (balanced 1:1, Pneumonia vs COVID-19 only), the same external COVID-19 cohort (sensitivity only)
real-external: $(STAMP)
	$(PY) -m cxrlib pipeline --dataset realdata --profile real-cpu --run-dir runs/realdata-external --notebooks 01 04 --param DATA_ROOT=$(DATA_ROOT) --param EXTERNAL=cxnet_covid --param 'CONDITIONS=["real"]' --param SITE_CONTROL=False
	$(PY) -m cxrlib pipeline --dataset chestxray_pneumonia --profile real-cpu --run-dir runs/chestxray_pneumonia-external --notebooks 01 04 --param DATA_ROOT=$(DATA_ROOT) --param EXTERNAL=cxnet_covid --param 'CONDITIONS=["real"]' --param 'TASKS=["pneumonia_vs_covid"]' --param 'RATIOS=[1]' --param SITE_CONTROL=False

test: $(STAMP)
	$(PY) -m pytest

lab: $(STAMP)
	$(VENV)/bin/jupyter lab $(LAB_ARGS) notebooks/

bench: $(STAMP)
	$(PY) benchmarks/run_all.py

clean-runs:
	rm -rf runs/
