# The two commands a newcomer needs: `make run` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install run test lint bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[worker,dev]'
	touch $@

install: $(VENV)/.installed

## Redis (started if absent), the API on :9090, one Celery worker and Flower on :5555, in the foreground.
run: install
	bash scripts/run.sh

## The whole suite, Label Studio end-to-end tests included (they install Label Studio into .venv-label-studio).
test: install lint
	$(BIN)/pytest

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: install
	$(BIN)/python bench/throughput.py
	$(BIN)/python bench/input_size.py
	$(BIN)/python bench/proxy_labels.py .bench-data/proxy-shape && $(BIN)/python bench/quality.py .bench-data/proxy-shape --limit-per-class 400

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
