# `make demo`: set up .venv and train the MNIST-1D recipe with the measurement callbacks.
# `make test`: set up .venv, lint, run the test suite and the newest-Lightning check (what CI runs, via .ci/run).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install demo test test-all lint test-newest-lightning bench clean

install: $(VENV)/.installed

# torch==2.13.0 first: it resolves to the local CPU wheel; any other spec would pull GBs of CUDA packages.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

demo: install
	$(BIN)/lightning-sgd fit --config recipes/mnist1d.yaml

test: install
	$(BIN)/ruff check .
	$(BIN)/python -m pytest
	bash .ci/newest_lightning.sh

# The Lightning-facing tests against the newest Lightning on the package index (LIGHTNING_VERSION=x.y.z for another).
test-newest-lightning: install
	bash .ci/newest_lightning.sh

test-all: install
	$(BIN)/python -m pytest -m ""

lint: install
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) runs .data build dist *.egg-info
