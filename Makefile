# The two commands that matter: `make run` (set up, then run the pipeline on the demo data)
# and `make test` (set up, then run the test suite, as CI does). Both create .venv on first use.
# `make test-fast`: the unit tests only (tests/unit, a couple of minutes on 2 cores).
# `make image`: the kdpipe image, for `kdpipe run --runner kfp-docker` (docker/build.sh; by
# default on a Debian base made here, which needs root and debootstrap; IMAGE_FLAGS=--no-push
# builds on python:3.11-slim instead).
VENV ?= .venv
BIN := $(VENV)/bin
PYTHON ?= python3
IMAGE_FLAGS ?= --local-base --no-push

.PHONY: setup run test test-fast lint image repro clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	touch $@

run: setup
	$(BIN)/kdpipe run

test: setup
	$(BIN)/python -m pytest -q -n auto --durations=25  # one worker per core (pytest-xdist); the slowest listed

test-fast: setup
	$(BIN)/python -m pytest -q -n auto tests/unit

lint: setup
	$(BIN)/ruff check .

image: setup
	PYTHON=$(abspath $(BIN))/python docker/build.sh $(IMAGE_FLAGS)

# The DVC pipeline: kdpipe must be on PATH for the stages' commands.
repro: setup
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/dvc repro

clean:
	rm -rf work .kdpipe-cache
