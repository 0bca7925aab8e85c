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

# synthetic demo data
DEMO_CASES ?= 10
DEMO_SHAPE ?= 240 240 155
DEMO_SEED  ?= 0

.PHONY: help setup synthetic preprocess cache-info cache-verify demo test bench clean-demo

help:  ## list targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | expand -t 16

setup:  ## create .venv and install the project with its dev extra
	test -x $(VENV)/bin/python || python3 -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q "$(TORCH)"
	$(VENV)/bin/python -m pip install -q -e ".[dev]"

synthetic:  ## write DEMO_CASES synthetic BraTS2020-style cases into RAW
	$(PYTHON) -m pipeline.synthetic $(RAW) --cases $(DEMO_CASES) --shape $(DEMO_SHAPE) --seed $(DEMO_SEED)

preprocess:  ## RAW case folders -> Zarr cache under CACHE (skips up-to-date cases)
	@if [ "$(RAW)" = "data/synthetic" ] && [ ! -d "$(RAW)" ]; then $(MAKE) --no-print-directory synthetic; fi
	$(PYTHON) -m preprocess $(RAW) --cache-dir $(CACHE) --jobs $(JOBS) $(PREPROCESS_ARGS)

cache-info:  ## cases, shapes, label counts and size of the cache under CACHE
	$(PYTHON) -m pipeline.cache info $(CACHE)

cache-verify:  ## read every cached case and check it against its attributes
	$(PYTHON) -m pipeline.cache verify $(CACHE)

demo: setup  ## fresh machine -> the whole job on synthetic data
	$(MAKE) --no-print-directory preprocess PYTHON=$(VENV)/bin/python
	$(MAKE) --no-print-directory cache-info PYTHON=$(VENV)/bin/python

test:  ## the test suite (CPU, a few minutes)
	$(PYTHON) -m pytest -q

bench:  ## benchmarks recorded in docs/benchmarks.md (slow: tens of minutes)
	$(PYTHON) -m benchmarks.run

clean-demo:  ## remove the synthetic data and caches made by the demo
	rm -rf data/synthetic $(CACHE)/synthetic-*
