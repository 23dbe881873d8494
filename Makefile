# Parley: `make serve` serves the bundled default model; `make test` runs the tests.
# Both set up a virtual environment with pinned packages on first use.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
READY := $(VENV)/.ready
MODEL_DIR := model/default
REPOSITORY := models
PACKAGE := $(REPOSITORY)/multi30k-en-de
DATA_DIR ?= ../shared/data/multi30k
# Export verifies each variant on Multi30k val against PyTorch and the references, and
# calibrates int8 activation scales on training sentences, never on the ones verified.
# Without the corpus it verifies on its own sample and int8 scales activations per row.
VERIFY_ON_VAL = $(if $(wildcard $(DATA_DIR)/val.en.gz),--sample $(DATA_DIR)/val.en.gz --sample-references $(DATA_DIR)/val.de.gz)
CALIBRATION = $(if $(wildcard $(DATA_DIR)/train.en.gz),--calibration $(DATA_DIR)/train.en.gz)

.PHONY: setup test serve eval train export bench bench-served bench-grpc-cost bench-scale bench-cuda proto clean

$(READY): requirements/serve.txt requirements/dev.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements/dev.txt
	touch $@

# Parley itself, editable; this compiles its C parts (setup.py) in place.
INSTALLED := $(VENV)/.installed
$(INSTALLED): $(READY) pyproject.toml setup.py decoding/_native.c server/engine/fused_ops.c
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

# gRPC code is generated from proto/ at build time, never committed.
GENERATED := parley/v1/translate_pb2.py
$(GENERATED): proto/parley/v1/translate.proto $(READY)
	$(BIN)/python -m server.proto_build

setup: $(INSTALLED) $(GENERATED)

proto: $(GENERATED)

test: setup
	$(BIN)/python -m pytest

serve: setup export
	$(BIN)/python -m server --model-repository $(REPOSITORY)

eval: setup
	$(BIN)/python -m model.evaluate $(MODEL_DIR) --data-dir $(DATA_DIR)

train: setup
	$(BIN)/python -m model.train --data-dir $(DATA_DIR) --out-dir runs/en-de --dropout 0.3

export: setup $(PACKAGE)/manifest.json

# The default model's package: built from the committed checkpoint, verified on Multi30k val.
$(PACKAGE)/manifest.json: $(READY) $(wildcard $(MODEL_DIR)/*) $(wildcard export/*.py) $(wildcard model/*.py) | $(INSTALLED)
	$(BIN)/python -m export $(MODEL_DIR) $(PACKAGE) --name multi30k-en-de --precision fp32,int8 --force $(VERIFY_ON_VAL) $(CALIBRATION)

BENCH_READY := $(VENV)/.bench-ready
$(BENCH_READY): requirements/bench.txt $(READY)
	$(BIN)/pip install --quiet -r requirements/bench.txt
	touch $@

# Throughput and quality against CTranslate2 and PyTorch; BENCH_QUICK=1 for a reduced grid.
bench: setup export $(BENCH_READY)
	DATA_DIR=$(DATA_DIR) $(BIN)/python -m bench.run

# Only the served paths (gRPC, the scheduler) against the offline engine; no CTranslate2 needed.
bench-served: setup export
	DATA_DIR=$(DATA_DIR) $(BIN)/python -m bench.run --served

# What gRPC alone (a server that only answers, and the load generator) takes from the offline
# engine at the call rate of 85% of its throughput: the ceiling of the served share here.
bench-grpc-cost: setup export
	DATA_DIR=$(DATA_DIR) $(BIN)/python -m bench.grpc_cost

# gRPC throughput against the number of replicas on this machine (round_robin over loopback).
bench-scale: setup export
	DATA_DIR=$(DATA_DIR) $(BIN)/python -m bench.scale

# On a CUDA machine: onnxruntime-gpu in place of onnxruntime, an fp16 package, host against
# device-resident caches (bench/results/cuda.json).
GPU_READY := $(VENV)/.gpu-ready
GPU_PACKAGE := $(REPOSITORY)/multi30k-en-de-gpu
$(GPU_READY): requirements/serve-gpu.txt $(READY)
	$(BIN)/pip uninstall --quiet --yes onnxruntime
	$(BIN)/pip install --quiet -r requirements/serve-gpu.txt
	touch $@

bench-cuda: setup $(GPU_READY)
	$(BIN)/python -m export $(MODEL_DIR) $(GPU_PACKAGE) --name multi30k-en-de --precision fp32,fp16 --force $(VERIFY_ON_VAL)
	$(BIN)/python -m bench.cuda $(GPU_PACKAGE) --data-dir $(DATA_DIR)

# What the build made. Training runs (runs/) and packages exported by hand into models/ stay.
clean:
	rm -rf $(VENV) $(PACKAGE) $(GPU_PACKAGE) parley build bench/.cache *.egg-info decoding/_native*.so \
		server/engine/_fused_ops*.so
