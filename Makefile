# Developer entry points. Each target creates its own virtual environment and builds the
# extension (CPU and, where torch is a CUDA build and a toolkit is found, CUDA kernels).
PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.14.1
CUDA_HOME ?= $(if $(wildcard /usr/local/cuda/bin/nvcc),/usr/local/cuda,)
export CUDA_HOME
BIN := $(VENV)/bin
PYTEST_ARGS ?= -q

.PHONY: demo test lint format bench build clean test-oldest-torch gpu-check-dry-run

demo: build
	$(BIN)/python examples/demo.py --work demo-work
	$(BIN)/python benchmarks/bench_cpu.py

test: build
	$(BIN)/ruff check lorax_merge tests benchmarks examples setup.py
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: build
	$(BIN)/python benchmarks/bench_cpu.py

# benchmarks/gpu_check.sh where no GPU is visible: it builds the CUDA sources for sm_90 into a
# temporary folder and collects the GPU tests, so the script a GPU machine runs is known to
# work before one is lent (CI runs this). Results in bench-results/gpu-check-dry-run/.
gpu-check-dry-run: $(VENV)/.deps
	PYTHON=$(BIN)/python MAX_JOBS=$${MAX_JOBS:-2} GPU_CHECK_BUILD_S=$${GPU_CHECK_BUILD_S:-900} \
		GPU_CHECK_BUDGET_S=$${GPU_CHECK_BUDGET_S:-1500} \
		bash benchmarks/gpu_check.sh bench-results/gpu-check-dry-run

lint: $(VENV)/.deps
	$(BIN)/ruff check lorax_merge tests benchmarks examples setup.py
	$(BIN)/ruff format --check lorax_merge tests benchmarks examples setup.py

# C++/CUDA style from .clang-format (clang-format on PATH, or CLANG_FORMAT=...), Python's from ruff.
CLANG_FORMAT ?= clang-format
CXX_SOURCES = $(shell git ls-files 'csrc/*.h' 'csrc/*.cpp' 'csrc/*.cu' 'csrc/*.cuh')

format: $(VENV)/.deps
	$(CLANG_FORMAT) -i $(CXX_SOURCES)
	$(BIN)/ruff format lorax_merge tests benchmarks examples setup.py

build: $(VENV)/.deps
	MAX_JOBS=$${MAX_JOBS:-2} $(BIN)/pip install --no-build-isolation --no-deps -e . -q

# Pinned, so that a new release of a test or lint dependency cannot change what CI checks.
DEV_PACKAGES := ninja==1.13.2 numpy==2.4.6 safetensors==0.8.0 peft==0.21.2 \
	transformers==5.24.0 hypothesis==6.170.17 pytest==9.2.0 ruff==0.17.6

$(VENV)/.deps: Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	$(BIN)/pip install -q torch==$(TORCH_VERSION) $(DEV_PACKAGES)
	touch $@

# The suite against the oldest supported torch (the LoRAX server's pin), CPU kernels only. Not part
# of `make test` or CI: it installs a second torch (a CUDA build of a few GB) into its own
# environment and builds and tests a copy of the tree, so the main build is left alone.
OLDEST_TORCH ?= 2.6.0
OLDEST_VENV ?= .venv-torch$(OLDEST_TORCH)
OLDEST_TREE := build/torch-$(OLDEST_TORCH)
OLDEST_PYTHON := $(abspath $(OLDEST_VENV))/bin/python

test-oldest-torch:
	$(MAKE) VENV=$(OLDEST_VENV) TORCH_VERSION=$(OLDEST_TORCH) $(OLDEST_VENV)/.deps
	rm -rf $(OLDEST_TREE) && mkdir -p $(OLDEST_TREE)
	git ls-files -z --cached --others --exclude-standard | xargs -0 cp --parents -t $(OLDEST_TREE)
	cd $(OLDEST_TREE) && LORAX_MERGE_CUDA=0 MAX_JOBS=$${MAX_JOBS:-2} \
		$(OLDEST_PYTHON) setup.py -q build_ext --inplace
	cd $(OLDEST_TREE) && $(OLDEST_PYTHON) -c \
		"import lorax_merge, torch; assert torch.__version__.startswith('$(OLDEST_TORCH)'); print(lorax_merge.build_info())"
	cd $(OLDEST_TREE) && $(OLDEST_PYTHON) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf build lorax_merge/_C*.so *.egg-info demo-work
