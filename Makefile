# Set-up and everyday commands. `make serve` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: serve test lint unit bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

serve: $(BIN)/.installed
	$(BIN)/tokenflow serve

test: lint
	scripts/install-test-deps.sh
	$(BIN)/pytest -q -p no:cacheprovider

# Lint and type-check (configured in pyproject.toml); any finding fails the build.
lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/mypy

bench: $(BIN)/.installed
	$(BIN)/tokenflow bench virtual --config configs/bench/h200-burst400.yaml

unit: $(BIN)/.installed
	$(BIN)/pytest -q tests/unit

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache
