# Two entry points: `make demo` (set up + run the pipeline on synthetic data) and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
DEMO_DIR ?= demo

.PHONY: setup demo test clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

demo: setup
	$(BIN)/rxray synth --out $(DEMO_DIR)/rxrx2-synth
	$(BIN)/rxray ingest --source $(DEMO_DIR)/rxrx2-synth --out $(DEMO_DIR)/run/shards --size 64 \
		--labels $(DEMO_DIR)/rxrx2-synth/moa.csv

test: setup
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(DEMO_DIR) .pytest_cache
