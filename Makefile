# The two commands a newcomer needs: `make run` and `make test` (and `make test-fast` without Label Studio).
# Every environment installs from the locks in requirements/ (README "Dependencies"); `make lock` remakes them.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# `make lock UPGRADE=--upgrade` moves every pin to the newest release allowed; `UPGRADE="--upgrade-package celery"`
# one package. Without it, `make lock` keeps each pin that still fits.
UPGRADE ?=
LOCK_FLAGS := --universal --python-version 3.11 --generate-hashes --quiet --custom-compile-command "make lock" $(UPGRADE)

.PHONY: install lock run demo test test-fast lint bench clean

# Keyed on pip, the last thing `python -m venv` writes: a creation cut short (Ctrl-C) is started over.
$(BIN)/pip:
	rm -rf $(VENV)
	$(PY) -m venv $(VENV)

# Exact versions and hashes from the lock, then the project itself, built by the locked setuptools.
$(VENV)/.installed: pyproject.toml requirements/dev.txt | $(BIN)/pip
	$(BIN)/pip install --quiet --disable-pip-version-check --require-hashes -r requirements/dev.txt
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $@

install: $(VENV)/.installed

## Re-resolve every lock from pyproject.toml and requirements/*.in (uv, from the project's venv; needs the index).
lock: install
	$(BIN)/uv pip compile pyproject.toml requirements/build.in --extra worker --extra run --extra dev \
		-c requirements/holds.in $(LOCK_FLAGS) -o requirements/dev.txt
	$(BIN)/uv pip compile pyproject.toml requirements/build.in -c requirements/dev.txt $(LOCK_FLAGS) \
		-o requirements/api.txt
	$(BIN)/uv pip compile pyproject.toml requirements/build.in --extra worker -c requirements/dev.txt \
		--override requirements/worker-image.in $(LOCK_FLAGS) -o requirements/worker.txt
	$(BIN)/uv pip compile requirements/label-studio.in $(LOCK_FLAGS) -o requirements/label-studio.txt

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
	$(BIN)/python bench/scale.py
	$(BIN)/python bench/ls_prediction_api.py
	$(BIN)/python bench/input_size.py
	$(BIN)/python bench/quality.py --calibration --order

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
