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

.PHONY: demo test reproduce evidence-baselines evidence evidence-headline evidence-finetune evidence-status install \
	install-test bench gpu-check clean

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

# The long runs (hours) never hold the terminal: each target starts its workers detached (nohup, nice 19, one thread
# each), prints where each logs, and returns at once; `make evidence-status` says where they stand. Several workers of
# one config share its trainings (each trains what no other holds; hf_r2/reproduce/pipeline.py) and resume per epoch,
# so rerunning a target after a reboot continues. Their caches live outside the work tree, under ~/.cache/hf-r2.
CACHE ?= $(HOME)/.cache/hf-r2
HF_R2 := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 OMP_NUM_THREADS=1 nohup nice -n 19 $(abspath $(VENV))/bin/hf-r2
# $(call start_workers,FOLDER,NAMES,COMMAND): one detached COMMAND per name in NAMES, logging to FOLDER/<name>.log;
# refuses while a worker started there before still runs.
define start_workers
	@mkdir -p $(1)
	@for f in $(1)/*.pid; do \
	  if [ -f "$$f" ] && kill -0 "$$(cat "$$f")" 2>/dev/null; then \
	    echo "a worker of $(1) still runs (pid $$(cat "$$f")): make evidence-status; stop it with kill $$(cat "$$f")"; \
	    exit 1; fi; done
	@for name in $(2); do \
	  $(3) > $(1)/$$name.log 2>&1 < /dev/null & echo $$! > $(1)/$$name.pid; \
	  echo "started $$name (pid $$!, nice 19, one thread); follow: tail -f $(1)/$$name.log"; done
endef

# The long targets name the configs shipped with hf-r2 by their preset names (`hf-r2 reproduce --help` lists them;
# the files are hf_r2/reproduce/configs/*.yaml, also reached as configs/*.yaml). REPRODUCE_CONFIG takes a preset
# name or a path.
# The paper side by side (preset paper: configs/reproduce.yaml, about an hour on 2 cores): two workers of the config;
# each ends by writing the report (results.md) in $(REPRODUCE_OUT).
REPRODUCE_CONFIG ?= paper
REPRODUCE_OUT ?= $(CACHE)/reproduce
reproduce: install
	$(call start_workers,$(REPRODUCE_OUT),worker-1 worker-2,$(HF_R2) reproduce $(REPRODUCE_CONFIG) \
	  --output-dir $(REPRODUCE_OUT) --no-progress)

# The evidence study (docs/results.md). Stage 1: each model trained with its family's standard
# recipe (SGD momentum 0.9, cosine, 30 epochs, 45k CIFAR-10 images, 5k held out for validation), one worker per
# model, resumable; about 70 min (mobilenetv2_100) and 2 h (resnet18) of one core each. Stage 2 (`make evidence`,
# preset evidence: configs/evidence.yaml, once stage 1 is done): R2 fine-tunes against the same-length control,
# lambdas chosen on validation, R2 from scratch, W2A2 PTQ and QAT.
EVIDENCE_OUT ?= $(CACHE)/evidence
EVIDENCE_TRAIN = $(HF_R2) train --dataset cifar10 \
	--validation_size 5000 --input_size 32 --num_train_epochs 30 --per_device_train_batch_size 64 \
	--per_device_eval_batch_size 500 --optim sgd --optim_args momentum=0.9 --learning_rate 0.05 \
	--lr_scheduler_type cosine --warmup_steps 0.01 --r2_weight 0 --eval_strategy epoch --save_strategy epoch \
	--save_total_limit 2 --logging_steps 100 --seed 0 --use_cpu --report_to none --resume_from_checkpoint latest
evidence-baselines: install
	$(call start_workers,$(EVIDENCE_OUT)/logs,baseline-mobilenetv2_100,$(EVIDENCE_TRAIN) --model mobilenetv2_100 \
	  --weight_decay 4e-5 --output_dir $(EVIDENCE_OUT)/baselines/mobilenetv2_100)
	@$(EVIDENCE_TRAIN) --model resnet18 --weight_decay 1e-4 --output_dir $(EVIDENCE_OUT)/baselines/resnet18 \
	  > $(EVIDENCE_OUT)/logs/baseline-resnet18.log 2>&1 < /dev/null & echo $$! > $(EVIDENCE_OUT)/logs/baseline-resnet18.pid; \
	  echo "started baseline-resnet18 (pid $$!, nice 19, one thread); follow: tail -f $(EVIDENCE_OUT)/logs/baseline-resnet18.log"
evidence: install
	$(call start_workers,$(EVIDENCE_OUT)/logs,worker-1 worker-2,$(HF_R2) reproduce evidence \
	  --output-dir $(EVIDENCE_OUT) --no-progress)

# The headline study (preset headline: configs/headline.yaml): the paper's claims from scratch against a tuned
# baseline (its weight decay swept and chosen on validation, R2 trained at the choice), on three seeds. Two workers; each takes
# MobileNetV2 through every stage before ResNet-18, then writes the report. About 10 trainings of 1.5-2 h of one core
# per model: days on 2 cores, resumable per epoch.
HEADLINE_OUT ?= $(CACHE)/headline
HEADLINE = $(abspath $(VENV))/bin/hf-r2 reproduce headline --output-dir $(HEADLINE_OUT) --no-progress
evidence-headline: install
	$(call start_workers,$(HEADLINE_OUT)/logs,worker-1 worker-2,HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 \
	  OMP_NUM_THREADS=1 nohup nice -n 19 sh -c '$(HEADLINE) --models mobilenetv2_100 && $(HEADLINE)')

# R2 for the model you already have (preset finetune: configs/finetune.yaml): fine-tunes of the headline study's
# MobileNetV2 baseline (seed 0, default weight decay; it must be finished) with and without R2, against QAT and MagR
# at the same budget. Two workers; a 2-epoch fine-tune is about 6 min of one idle core.
FINETUNE_OUT ?= $(CACHE)/finetune
evidence-finetune: install
	$(call start_workers,$(FINETUNE_OUT)/logs,worker-1 worker-2,$(HF_R2) reproduce finetune \
	  --output-dir $(FINETUNE_OUT) --no-progress)

# Where the long runs stand, from their caches (trains nothing): each worker running or ended with its log's last
# line, then per training done / running (epoch k of n) / interrupted / missing and the choices made so far.
evidence-status: install
	@for f in $(HEADLINE_OUT)/logs/*.pid $(FINETUNE_OUT)/logs/*.pid $(EVIDENCE_OUT)/logs/*.pid $(REPRODUCE_OUT)/*.pid; do \
	  [ -f "$$f" ] || continue; \
	  if kill -0 "$$(cat "$$f")" 2>/dev/null; then state=running; else state=ended; fi; \
	  echo "$$f: $$state; last log line: $$(tail -c 400 "$${f%.pid}.log" | tr '\r' '\n' | grep -v '^ *$$' | tail -n 1)"; \
	done
	@HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(VENV)/bin/hf-r2 reproduce headline \
	  --output-dir $(HEADLINE_OUT) --status
	@if [ -d $(FINETUNE_OUT)/runs ]; then HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(VENV)/bin/hf-r2 reproduce finetune \
	  --output-dir $(FINETUNE_OUT) --status; fi

bench: install
	$(PY) benchmarks/r2_overhead.py

# On a machine with a CUDA GPU and PyTorch (its own packages, nothing installed): the device tests and the R2
# overhead benchmark on the GPU, logged to $(GPU_CHECK_OUT)/gpu_check.txt (README, Results).
GPU_CHECK_OUT ?= outputs/gpu_check
gpu-check:
	bash benchmarks/gpu_check.sh $(GPU_CHECK_OUT)

clean:
	rm -rf $(VENV) outputs runs
