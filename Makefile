# The two commands a newcomer needs: `make run` and `make test` (and `make test-fast` without Label Studio).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install run demo test test-fast lint bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[worker,dev,run]'
	touch $@

install: $(VENV)/.installed

## The Procfile (API, worker, beat, Flower) under honcho, in the foreground, with Redis started if absent.
run: install
	$(BIN)/python scripts/run.py

## Label Studio (its own venv), the backend and a project of shared particles with predictions; Ctrl-C stops all.
demo: install
	$(BIN)/python scripts/demo.py

## The whole suite, Label Studio end-to-end tests included (they install Label Studio into .venv-label-studio).
test: install lint
	$(BIN)/pytest

## Everything but the Label Studio end-to-end tests.
test-fast: install lint
	$(BIN)/pytest -m "not e2e"

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: install
	$(BIN)/python bench/throughput.py
	$(BIN)/python bench/throughput_ls.py
	$(BIN)/python bench/chaos.py
	$(BIN)/python bench/input_size.py
	$(BIN)/python bench/quality.py --image-sizes 224,48 --order

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
