# Kiln: `make demo` runs the pipeline on the embedded default, `make test` runs the tests.
# Both build .venv first if it is missing (or older than pyproject.toml).

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH  ?= torch==2.13.0
DEEPSPEED ?= deepspeed==0.19.8
STAMP  := $(VENV)/.kiln-installed

.PHONY: demo test test-fast lint format bench venv clean-venv clean

venv: $(STAMP)

# torch first and pinned (the CPU build on this machine's disk; an unpinned torch resolves to a
# multi-GB CUDA build), then DeepSpeed from source without build isolation so that it compiles against
# that torch and never pulls another one; DS_BUILD_SHM_COMM=1 precompiles its CPU collective op once
# here instead of at the first gloo init of every fresh extension cache.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip setuptools wheel
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -c "import deepspeed" 2>/dev/null || \
	  DS_BUILD_SHM_COMM=1 $(BIN)/python -m pip install --quiet --no-build-isolation --no-cache-dir "$(DEEPSPEED)"
	$(BIN)/python -m pip install --quiet -e ".[dev]" "$(TORCH)"
	touch $(STAMP)

# The demo crawls Python's standard-library docs (pydoc HTML, built once into .kiln/docs_site), served
# on 127.0.0.1:8765 only while the pipeline runs.
demo: $(STAMP)
	$(BIN)/python examples/docs_site.py run --port 8765 -- $(BIN)/kiln run configs/demo.yaml

test: $(STAMP) lint
	$(BIN)/python -m pytest

# ruff: lint rules and formatting, both set in pyproject.toml; `make format` applies them.
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow"

bench: $(STAMP)
	@ls bench/*.py >/dev/null 2>&1 && for b in bench/*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done || echo "no benchmarks yet"

clean:
	rm -rf .kiln

clean-venv:
	rm -rf $(VENV)
