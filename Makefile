# Set-up installs torch 2.13.0 (CPU wheel) only where torch is missing: a user's CUDA torch is kept.
PYTHON ?= python

.PHONY: install install-test demo serve test lint

install:
	$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install torch==2.13.0
	$(PYTHON) -m pip install -e .

install-test:
	$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install torch==2.13.0
	$(PYTHON) -m pip install -e ".[test]"

demo: install
	preft demo

lint:
	ruff check .
	ruff format --check .

test: install-test lint
	$(PYTHON) -m pytest -q
