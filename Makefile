# Two set-up commands for a fresh machine: `make demo` and `make test`. Both create .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck unit bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/dicom-proxy demo --workdir demo-run

lint: $(STAMP)
	$(BIN)/ruff check proxy tests bench

typecheck: $(STAMP)
	$(BIN)/mypy --strict proxy

test: lint typecheck
	$(BIN)/pytest -q -ra

unit: $(STAMP)
	$(BIN)/pytest -q -m "not slow" tests/test_dul_*.py tests/test_config.py

bench: $(STAMP)
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) demo-run bench/out .pytest_cache .mypy_cache .ruff_cache
