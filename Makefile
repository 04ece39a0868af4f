# DermAID: `make demo` runs the main job on embedded defaults; `make test` runs the test suite.
# Both create .venv on first use, so each is the single command on a fresh clone.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-fast lab bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip setuptools wheel
	$(BIN)/pip install "torch==2.14.1" "torchvision==0.29.1" || $(BIN)/pip install torch torchvision
	$(BIN)/pip install -e ".[dev]"
	touch $(STAMP)

demo: setup
	$(BIN)/python -m dermaid.demo

test: setup
	RAY_DEDUP_LOGS=0 $(BIN)/python -m pytest -v --timeout=1800 tests

test-fast: setup
	$(BIN)/python -m pytest -v -m "not slow" tests

lab: setup
	$(BIN)/python -m ipykernel install --sys-prefix --name dermaid --display-name "DermAID (.venv)"
	$(BIN)/jupyter lab notebooks/

clean:
	rm -rf runs reports outputs data/toy
