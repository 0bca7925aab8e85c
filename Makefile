# BraTS pipeline. Every path is a variable: `make preprocess RAW=/data/MICCAI_BraTS2020_TrainingData`.
VENV    ?= .venv
PYTHON  ?= $(if $(wildcard $(VENV)/bin/python),$(VENV)/bin/python,python3)
# torch is pinned to a release whose wheel installs quickly; override for another build, e.g. TORCH=torch
TORCH   ?= torch==2.13.0

# offline stage
RAW     ?= data/synthetic
CACHE   ?= data_cache
JOBS    ?= -1
PREPROCESS_ARGS ?=

# training stage: with no TRAIN_ARGS, `make train` trains what `python -m train` trains on this device
# (the device's recipe); the demo passes its own small settings (DEMO_TRAIN_ARGS)
RUN     ?= runs/demo
TRAIN_ARGS ?=
DEMO_TRAIN_ARGS ?= --preset small --patch-size 64 64 64 --epochs 8 --iters-per-epoch 40 --optimizer adamw \
	--lr 3e-3 --val-every 2 --overwrite

# prediction and evaluation
IN      ?= $(DEMO_VAL)
OUT     ?= $(RUN)/predictions
PRED    ?= $(OUT)
GT      ?= $(DEMO_VAL)
PREDICT_ARGS ?=

# synthetic demo data: half-size volumes (1/8 of the voxels) so that CPU training fits in minutes;
# DEMO_SHAPE="240 240 155" gives full-size BraTS geometry
DEMO_CASES ?= 12
DEMO_SHAPE ?= 120 120 78
DEMO_SEED  ?= 0
DEMO_VAL_CASES ?= 4
DEMO_VAL   ?= data/synthetic-val

.PHONY: help setup setup-official synthetic preprocess cache-info cache-verify train cv predict evaluate evaluate-run demo test typecheck lint bench bench-quality clean-demo

help:  ## list targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | expand -t 16

setup:  ## create .venv and install the project with its dev extra
	test -x $(VENV)/bin/python || python3 -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q "$(TORCH)"
	$(VENV)/bin/python -m pip install -q -e ".[dev]"

setup-official:  ## install the BraTS organisers' evaluation package into .venv-official (tests cross-check our metrics with it)
	test -x .venv-official/bin/python || python3 -m venv .venv-official
	.venv-official/bin/python -m pip install -q "brats-evaluation==0.0.10"

synthetic:  ## write DEMO_CASES synthetic BraTS2020-style cases into RAW, and DEMO_VAL_CASES held-out ones into DEMO_VAL
	$(PYTHON) -m pipeline.synthetic $(RAW) --cases $(DEMO_CASES) --shape $(DEMO_SHAPE) --seed $(DEMO_SEED)
	$(PYTHON) -m pipeline.synthetic $(DEMO_VAL) --cases $(DEMO_VAL_CASES) --shape $(DEMO_SHAPE) \
		--seed $(DEMO_SEED) --start 101

preprocess:  ## RAW case folders -> Zarr cache under CACHE (skips up-to-date cases)
	@if [ "$(RAW)" = "data/synthetic" ] && { [ ! -d "$(RAW)" ] || [ ! -d "$(DEMO_VAL)" ]; }; then \
		$(MAKE) --no-print-directory synthetic; fi
	$(PYTHON) -m preprocess $(RAW) --cache-dir $(CACHE) --jobs $(JOBS) $(PREPROCESS_ARGS)

cache-info:  ## cases, shapes, label counts and size of the cache under CACHE
	$(PYTHON) -m pipeline.cache info $(CACHE)

cache-verify:  ## read every cached case and check it against its attributes
	$(PYTHON) -m pipeline.cache verify $(CACHE)

train:  ## train the device's recipe on CACHE into RUN (settings, --resume or --overwrite via TRAIN_ARGS)
	$(PYTHON) -m train --cache-dir $(CACHE) --run-dir $(RUN) $(TRAIN_ARGS)

cv:  ## cross-validation on CACHE into RUN: every fold, then all, then post-processing (settings via TRAIN_ARGS)
	$(PYTHON) -m train.cv --cache-dir $(CACHE) --run-dir $(RUN) $(TRAIN_ARGS)

predict:  ## segment the raw case folders in IN with RUN's best checkpoint into OUT
	$(PYTHON) -m train.predict --run $(RUN) --input $(IN) --output $(OUT) $(PREDICT_ARGS)

evaluate:  ## Dice, HD95, sensitivity, specificity, volumes of PRED against the segs in GT
	$(PYTHON) -m train.evaluate --pred $(PRED) --gt $(GT)

evaluate-run:  ## predict and evaluate RUN's validation cases straight from the cache
	$(PYTHON) -m train.evaluate --run $(RUN)

demo: setup  ## fresh machine -> the whole job on synthetic data (about 6 minutes on 2 CPU cores)
	$(MAKE) --no-print-directory preprocess PYTHON=$(VENV)/bin/python
	$(MAKE) --no-print-directory cache-info PYTHON=$(VENV)/bin/python
	$(MAKE) --no-print-directory train PYTHON=$(VENV)/bin/python TRAIN_ARGS="$(DEMO_TRAIN_ARGS)"
	$(MAKE) --no-print-directory predict PYTHON=$(VENV)/bin/python
	$(MAKE) --no-print-directory evaluate PYTHON=$(VENV)/bin/python

test:  ## the type check and the linter, then the test suite (CPU, 9-13 minutes on 2 cores)
	$(MAKE) --no-print-directory typecheck PYTHON=$(PYTHON)
	$(MAKE) --no-print-directory lint PYTHON=$(PYTHON)
	$(PYTHON) -m pytest -q

typecheck:  ## mypy --strict on pipeline, preprocess and train (settings in pyproject.toml)
	$(PYTHON) -m mypy

lint:  ## ruff: pyflakes, import order, bugbear, pyupgrade (settings in pyproject.toml)
	$(PYTHON) -m ruff check .

bench:  ## benchmarks recorded in docs/benchmarks.md (slow: about 3.5 hours, 2 of them the quality section)
	$(PYTHON) -m benchmarks.run

bench-quality:  ## 3-fold cross-validation of the CPU recipe on the 17 real cases, 35 min per fold (resumable)
	$(PYTHON) -m benchmarks.run --only quality

clean-demo:  ## remove the synthetic data and caches made by the demo
	rm -rf data/synthetic data/synthetic-val $(CACHE)/synthetic-* runs/demo
