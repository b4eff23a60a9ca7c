# Quick start: `make demo` and `make test` each set up .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The tested CPU build; the package itself asks for torch>=2.11 with no upper cap.
TORCH_PIN := torch==2.13.0

.PHONY: setup test test-thorough demo bench roofline clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(TORCH_PIN)
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-thorough: $(STAMP)
	HYPOTHESIS_PROFILE=thorough $(BIN)/python -m pytest -q properties

demo: $(STAMP)
	$(BIN)/python -m memopt_func demo

bench: $(STAMP)
	$(BIN)/python -m pytest -q bench --benchmark-enable --benchmark-only

roofline: $(STAMP)
	$(BIN)/python bench/roofline.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis .benchmarks *.egg-info
