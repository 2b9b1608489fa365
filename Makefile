# Developer entry points. Each target creates its own virtual environment and builds the
# extension (CPU and, where torch is a CUDA build and a toolkit is found, CUDA kernels).
PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.14.1
CUDA_HOME ?= $(if $(wildcard /usr/local/cuda/bin/nvcc),/usr/local/cuda,)
export CUDA_HOME
BIN := $(VENV)/bin
PYTEST_ARGS ?= -q

.PHONY: demo test lint bench build clean

demo: build
	$(BIN)/python examples/demo.py --work demo-work
	$(BIN)/python benchmarks/bench_cpu.py

test: build
	$(BIN)/ruff check lorax_merge tests benchmarks examples setup.py
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: build
	$(BIN)/python benchmarks/bench_cpu.py

lint: $(VENV)/.deps
	$(BIN)/ruff check lorax_merge tests benchmarks examples setup.py
	$(BIN)/ruff format --check lorax_merge tests benchmarks examples setup.py

build: $(VENV)/.deps
	MAX_JOBS=$${MAX_JOBS:-2} $(BIN)/pip install --no-build-isolation --no-deps -e . -q

$(VENV)/.deps:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	$(BIN)/pip install -q torch==$(TORCH_VERSION) ninja numpy
	$(BIN)/pip install -q safetensors peft transformers hypothesis pytest ruff
	touch $@

clean:
	rm -rf build lorax_merge/_C*.so *.egg-info demo-work
