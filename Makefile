# Set-up and entry points. `make demo` runs the main job, `make test` the tests; both create
# .venv on first use. torch is pinned to the CPU wheel this machine kind keeps on local disk;
# on a GPU machine install your CUDA torch first: make TORCH='torch' test
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0

.PHONY: test test-slow test-all demo bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q '$(TORCH)'
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

test: $(VENV)/.installed
	$(BIN)/python -m pytest -q

test-slow: $(VENV)/.installed
	$(BIN)/python -m pytest -q -m slow

test-all: $(VENV)/.installed
	$(BIN)/python -m pytest -q -m ''

demo: $(VENV)/.installed
	$(BIN)/farcast demo farcast-demo

bench: $(VENV)/.installed
	$(BIN)/python bench/ingest.py

clean:
	rm -rf $(VENV) farcast-demo bench/out
