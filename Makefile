# Two entry points: `make demo` (set up + run the pipeline on synthetic data) and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
DEMO_DIR ?= demo

.PHONY: setup demo test ray-logs chaos gpu-check clean

setup: $(VENV)/.installed

# Python writes the bytecode of each module the first time any process imports it, so only the ~3k modules rxray
# imports are compiled, once, not the ~20k files pip compiles at install (~100 s on 2 cores): setup took 109 s on
# 2026-12-07, 140 s when compileall did ~14k of them. Machines that set PYTHONDONTWRITEBYTECODE (CI here does)
# would compile them afresh in every process: each Ray worker, each CLI call (a command run outside make keeps the
# variable, and still reads what `make test` or `make demo` compiled). The cache lives in .venv and the git-ignored
# __pycache__ folders.
unexport PYTHONDONTWRITEBYTECODE

# testing/ is rxray's test support (a multi-node cluster on one machine, a node killer, faults injected into
# training workers): installed here beside rxray, never part of the rxray wheel.
$(VENV)/.installed: pyproject.toml testing/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet --no-compile -e ".[dev]" -e ./testing
	touch $@

# The whole pipeline on the default synthetic dataset (rayjobs/configs/demo.yaml); rerunning skips the
# steps that are complete. Its output ends with the findings, headed by the path of the HTML report.
demo: setup
	$(BIN)/rxray pipeline --config rayjobs/configs/demo.yaml --run $(DEMO_DIR)/run --source $(DEMO_DIR)/rxrx2-synth

test: setup
	$(BIN)/python -m pytest -q || { status=$$?; $(MAKE) --no-print-directory ray-logs; exit $$status; }

# A pytest that ends without its summary was killed under it (a Ray driver exits at once when its raylet or GCS
# dies): the end of the session's own logs then says why. `make test` prints them whenever pytest fails.
RAY_LOGS := /tmp/ray/session_latest/logs
ray-logs:
	@for log in $(RAY_LOGS)/raylet.out $(RAY_LOGS)/gcs_server.out \
		$$(ls -t $(RAY_LOGS)/python-core-driver-*.log 2>/dev/null | head -1); do \
		[ -f "$$log" ] && { echo "--- last lines of $$log"; tail -n 30 "$$log"; }; done; true

# The fault scenarios that take minutes to stage (nodes and the head killed under a submitted pipeline in
# tests/test_node_loss.py, a search SIGKILLed and resumed in tests/test_tune.py: about 6 minutes), kept out of
# `make test` for its time.
chaos: setup
	$(BIN)/python -m pytest -q -m chaos

# On a machine with a GPU: train, embed, a GPU pipeline and ingest benchmarks into docs/ (under 8 minutes on one
# H200); `rxray bench gpu --tiny` rehearses it on CPU.
gpu-check: setup
	$(BIN)/rxray bench gpu

clean:
	rm -rf $(DEMO_DIR) .pytest_cache
