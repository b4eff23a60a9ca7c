# Quick start: `make demo` and `make test` each set up .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The tested CPU build; the package itself asks for torch>=2.11 with no upper cap.
TORCH_PIN := torch==2.13.0
# Test processes (pytest-xdist): most of the suite's time is compiling, one core per worker.
TEST_WORKERS ?= 2

.PHONY: setup test test-thorough docs demo lm bench roofline wheel-check mutants clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(TORCH_PIN)
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS)

# The documentation site into site/ (strict: a warning fails; tests/test_docs.py builds it in make test too).
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/python -m mkdocs build --strict

test-thorough: $(STAMP)
	HYPOTHESIS_PROFILE=thorough $(BIN)/python -m pytest -q -n $(TEST_WORKERS) properties

# Planted mutations (tests/mutants/mutants.py), one at a time in a temporary copy of the tree,
# against a fast test subset: the kill rate and every survivor with its judgement (~35 minutes).
mutants: $(STAMP)
	$(BIN)/python tests/mutants/run.py

# Build the wheel, install it into a fresh venv outside the checkout, import it and step every
# optimizer once, eager and compiled.
wheel-check: $(STAMP)
	rm -rf dist && $(BIN)/python -m pip wheel -q --no-deps -w dist . 2>&1 | grep -v WARNING || true
	d=$$(mktemp -d) && $(PYTHON) -m venv $$d/venv && $$d/venv/bin/python -m pip install -q $(TORCH_PIN) 2>&1 | grep -v WARNING; \
	$$d/venv/bin/python -m pip install -q dist/*.whl 2>&1 | grep -v WARNING; \
	cp tests/install_check.py $$d/ && cd $$d && ./venv/bin/python install_check.py; rc=$$?; rm -rf $$d; exit $$rc

# The language-model comparison's quick preset (about 1 minute on 2 CPU cores); the spirals
# demo is `memopt-func demo`.
demo: $(STAMP)
	$(BIN)/python -m memopt_func lm --quick

# The default preset behind the README's figure (about 13 minutes on 2 CPU cores).
lm: $(STAMP)
	$(BIN)/python -m memopt_func lm

bench: $(STAMP)
	$(BIN)/python -m pytest -q bench --benchmark-enable --benchmark-only

# On a CUDA machine: GPU correctness checks, then speed against fused and compiled AdamW
# (bench/results/gpu/); without CUDA, `make gpu-check ARGS=--dry-run` runs the same code path.
gpu-check: $(STAMP)
	$(BIN)/python bench/gpu_check.py $(ARGS)

roofline: $(STAMP)
	$(BIN)/python bench/roofline.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis .benchmarks *.egg-info dist build site
