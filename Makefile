# Set-up installs torch 2.13.0 (CPU wheel) only where torch is missing: a user's CUDA torch is kept.
PYTHON ?= python

.PHONY: torch install install-server install-test serve demo lint test

torch:
	$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install torch==2.13.0

install: torch
	$(PYTHON) -m pip install -e .

install-server: torch
	$(PYTHON) -m pip install -e ".[server]"

install-test: torch
	$(PYTHON) -m pip install -e ".[test]"

serve: install-server
	preft serve

demo: install
	preft demo

lint:
	ruff check .
	ruff format --check .

test: install-test lint
	$(PYTHON) -m pytest -q
