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

# training stage
RUN     ?= runs/demo
PRESET  ?= small
PATCH   ?= 64 64 64
EPOCHS  ?= 8
ITERS   ?= 40
TRAIN_ARGS ?= --optimizer adamw --lr 3e-3 --val-every 2

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

.PHONY: help setup synthetic preprocess cache-info cache-verify train predict evaluate evaluate-run demo test typecheck bench bench-quality clean-demo

help:  ## list targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | expand -t 16

setup:  ## create .venv and install the project with its dev extra
	test -x $(VENV)/bin/python || python3 -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q "$(TORCH)"
	$(VENV)/bin/python -m pip install -q -e ".[dev]"

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

train:  ## train PRESET on the cache under CACHE into RUN (add --resume via TRAIN_ARGS)
	$(PYTHON) -m train --cache-dir $(CACHE) --run-dir $(RUN) --preset $(PRESET) --patch-size $(PATCH) \
		--epochs $(EPOCHS) --iters-per-epoch $(ITERS) $(TRAIN_ARGS)

predict:  ## segment the raw case folders in IN with RUN's best checkpoint into OUT
	$(PYTHON) -m train.predict --run $(RUN) --input $(IN) --output $(OUT) $(PREDICT_ARGS)

evaluate:  ## Dice, HD95, sensitivity, specificity, volumes of PRED against the segs in GT
	$(PYTHON) -m train.evaluate --pred $(PRED) --gt $(GT)

evaluate-run:  ## predict and evaluate RUN's validation cases straight from the cache
	$(PYTHON) -m train.evaluate --run $(RUN)

demo: setup  ## fresh machine -> the whole job on synthetic data (about 6 minutes on 2 CPU cores)
	$(MAKE) --no-print-directory preprocess PYTHON=$(VENV)/bin/python
	$(MAKE) --no-print-directory cache-info PYTHON=$(VENV)/bin/python
	$(MAKE) --no-print-directory train PYTHON=$(VENV)/bin/python
	$(MAKE) --no-print-directory predict PYTHON=$(VENV)/bin/python
	$(MAKE) --no-print-directory evaluate PYTHON=$(VENV)/bin/python

test:  ## the type check, then the test suite (CPU, about 4 minutes)
	$(MAKE) --no-print-directory typecheck PYTHON=$(PYTHON)
	$(PYTHON) -m pytest -q

typecheck:  ## mypy --strict on the shared library (settings in pyproject.toml)
	$(PYTHON) -m mypy

bench:  ## benchmarks recorded in docs/benchmarks.md (slow: about 2.5 hours, 70 minutes of it the quality section)
	$(PYTHON) -m benchmarks.run

bench-quality:  ## the CPU recipe trained 35 minutes per fold on the real cases, scored on the held-out fold
	$(PYTHON) -m benchmarks.run --only quality

clean-demo:  ## remove the synthetic data and caches made by the demo
	rm -rf data/synthetic data/synthetic-val $(CACHE)/synthetic-* runs/demo
