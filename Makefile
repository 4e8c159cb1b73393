# Two entry points: `make demo` (set up + run the pipeline on synthetic data) and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
DEMO_DIR ?= demo

.PHONY: setup demo test gpu-check clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

# The whole pipeline on the default synthetic dataset (rayjobs/configs/demo.yaml); rerunning skips the
# steps that are complete.
demo: setup
	$(BIN)/rxray pipeline --config rayjobs/configs/demo.yaml --run $(DEMO_DIR)/run --source $(DEMO_DIR)/rxrx2-synth
	@echo "HTML report: $(abspath $(DEMO_DIR))/run/report/report.html"

test: setup
	$(BIN)/python -m pytest -q

# On a machine with a GPU: train, embed, a GPU pipeline and ingest benchmarks into docs/ (under 8 minutes on one
# H200); `rxray bench gpu --tiny` rehearses it on CPU.
gpu-check: setup
	$(BIN)/rxray bench gpu

clean:
	rm -rf $(DEMO_DIR) .pytest_cache
