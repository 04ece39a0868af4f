# DermAID: `make demo` runs the main job on embedded defaults; `make test` runs the test suite.
# Both create .venv on first use, so each is the single command on a fresh clone.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The exact versions the tests passed on (also read by environment.yml and cluster/Dockerfile).
CONSTRAINTS := constraints.txt
# What a torch build pins: dropped from the constraints when the tested torch cannot be had.
TORCH_PINS := ^(torch|torchvision|triton|nvidia-[^=]+|cuda-[^=]+)==

.PHONY: setup demo test test-fast lab bench clean

setup: $(STAMP)

# torch first, on its own: the tested build (a local wheel here) or, where it is absent, the index's
# torch with every other pin kept. The extras: dev (tests), postgres (psycopg2), lab (JupyterLab).
$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -c $(CONSTRAINTS) --upgrade pip setuptools wheel
	cp $(CONSTRAINTS) $(VENV)/constraints.txt
	$(BIN)/pip install -c $(CONSTRAINTS) torch torchvision || { \
	  echo "make setup: the tested torch is not available; installing the index's torch, other pins kept"; \
	  $(BIN)/pip install torch torchvision && grep -vE '$(TORCH_PINS)' $(CONSTRAINTS) > $(VENV)/constraints.txt; }
	$(BIN)/pip install -c $(VENV)/constraints.txt -e ".[dev,postgres,lab]"
	touch $(STAMP)

demo: setup
	$(BIN)/python -m dermaid.demo

# Every test: unit and integration (Ray cluster, Ray-trained run, Serve, browser, PostgreSQL).
test: setup
	RAY_DEDUP_LOGS=0 $(BIN)/python -m pytest -v --timeout=1800 tests

# The fast tier (under 3 minutes on 2 cores): tests/conftest.py marks `integration` from their fixtures.
test-fast: setup
	$(BIN)/python -m pytest -v --timeout=600 -m "not integration" tests

lab: setup
	$(BIN)/python -m ipykernel install --sys-prefix --name dermaid --display-name "DermAID (.venv)"
	$(BIN)/jupyter lab notebooks/

clean:
	rm -rf runs reports outputs data/toy
