# The README's two commands: `make demo` (the main job) and `make test` (the test suite).
# Both create .venv if missing and install into it; PYTHON picks the interpreter that makes it.
PYTHON ?= python3
VENV ?= .venv
PIP := $(VENV)/bin/pip
PY := $(VENV)/bin/python
CONSTRAINTS := requirements/constraints.txt
# Where hf_r2 finds the local CIFAR-10 copies (cifar10/, cifar10-small/, cifar10-tiny/): the checkout's ../shared/data
# unless already set. Without a local copy the cifar10 names load uoft-cs/cifar10 from the Hub.
export HF_R2_DATA_DIR ?= $(abspath ../shared/data)

.PHONY: demo test reproduce install install-test bench clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: $(VENV)/bin/python setup.cfg pyproject.toml $(CONSTRAINTS)
	$(PIP) install -q -c $(CONSTRAINTS) -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) install -q -c $(CONSTRAINTS) -e ".[test]"
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

demo: install
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(VENV)/bin/hf-r2 demo

test: install-test
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) -m pytest -q

# The full comparison (configs/reproduce.yaml, about an hour on 2 cores): one single-threaded process per model in
# parallel, each logging to outputs/reproduce/<model>.log, then one run that reuses both and writes the report.
REPRODUCE_CONFIG ?= configs/reproduce.yaml
REPRODUCE_MODELS ?= mobilenetv3_small_100 resnet10t
REPRODUCE_OUT ?= outputs/reproduce
reproduce: install
	mkdir -p $(REPRODUCE_OUT)
	for m in $(REPRODUCE_MODELS); do \
	  HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 OMP_NUM_THREADS=1 $(VENV)/bin/hf-r2 reproduce $(REPRODUCE_CONFIG) \
	    --output-dir $(REPRODUCE_OUT) --models $$m --no-progress > $(REPRODUCE_OUT)/$$m.log 2>&1 & \
	done; wait
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(VENV)/bin/hf-r2 reproduce $(REPRODUCE_CONFIG) --output-dir $(REPRODUCE_OUT)

bench: install
	$(PY) benchmarks/r2_overhead.py

clean:
	rm -rf $(VENV) outputs runs
