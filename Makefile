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

.PHONY: demo test reproduce evidence-baselines evidence install install-test bench gpu-check clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: $(VENV)/bin/python setup.cfg pyproject.toml $(CONSTRAINTS)
	$(PIP) install -q -c $(CONSTRAINTS) -e ".[onnx]"
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

# The converged-model comparison (README, Results). Stage 1: each model trained to a plateau with its family's
# standard recipe (SGD momentum 0.9, cosine, 30 epochs, 45k CIFAR-10 images, 5k held out for validation), one
# single-threaded process per model, resumable (rerun to continue from the last epoch's checkpoint); about 70 min
# (mobilenetv2_100) and 2 h (resnet18) of one core each. Stage 2 (`make evidence`, configs/evidence.yaml): R2
# fine-tunes against the same-length control, lambdas chosen on validation, R2 from scratch, W2A2 PTQ and QAT.
EVIDENCE_OUT ?= outputs/evidence
EVIDENCE_TRAIN = HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 OMP_NUM_THREADS=1 $(VENV)/bin/hf-r2 train --dataset cifar10 \
	--validation_size 5000 --input_size 32 --num_train_epochs 30 --per_device_train_batch_size 64 \
	--per_device_eval_batch_size 500 --optim sgd --optim_args momentum=0.9 --learning_rate 0.05 \
	--lr_scheduler_type cosine --warmup_steps 0.01 --r2_weight 0 --eval_strategy epoch --save_strategy epoch \
	--save_total_limit 2 --logging_steps 100 --seed 0 --use_cpu --report_to none --resume_from_checkpoint latest
evidence-baselines: install
	mkdir -p $(EVIDENCE_OUT)/baselines
	$(EVIDENCE_TRAIN) --model mobilenetv2_100 --weight_decay 4e-5 --output_dir $(EVIDENCE_OUT)/baselines/mobilenetv2_100 \
	  > $(EVIDENCE_OUT)/mobilenetv2_100.log 2>&1 & \
	$(EVIDENCE_TRAIN) --model resnet18 --weight_decay 1e-4 --output_dir $(EVIDENCE_OUT)/baselines/resnet18 \
	  > $(EVIDENCE_OUT)/resnet18.log 2>&1 & wait
evidence: install
	for m in mobilenetv2_100 resnet18; do \
	  HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 OMP_NUM_THREADS=1 $(VENV)/bin/hf-r2 reproduce configs/evidence.yaml \
	    --output-dir $(EVIDENCE_OUT) --models $$m --no-progress > $(EVIDENCE_OUT)/evidence-$$m.log 2>&1 & \
	done; wait
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(VENV)/bin/hf-r2 reproduce configs/evidence.yaml --output-dir $(EVIDENCE_OUT)

bench: install
	$(PY) benchmarks/r2_overhead.py

# On a machine with a CUDA GPU and PyTorch (its own packages, nothing installed): the device tests and the R2
# overhead benchmark on the GPU, logged to $(GPU_CHECK_OUT)/gpu_check.txt (README, Results).
GPU_CHECK_OUT ?= outputs/gpu_check
gpu-check:
	bash benchmarks/gpu_check.sh $(GPU_CHECK_OUT)

clean:
	rm -rf $(VENV) outputs runs
