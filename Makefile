# Two commands: `make run` (the pipeline on the default preset) and `make test`.
# Both create .venv when missing and install the project with torch pinned to the CPU wheel.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: install run smoke test test-fast bench monitor clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e '.[test]'
	@if $(BIN)/pip list 2>/dev/null | grep -qi nvidia; then echo "CUDA packages were installed: check constraints.txt" >&2; exit 1; fi
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/python -m pipelines.full --preset default $(ARGS)

smoke: $(STAMP)
	$(BIN)/python -m pipelines.full --preset smoke --run-dir runs/smoke $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Unit tests only: no Ray cluster, no slow end-to-end runs (a few minutes).
test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow and not ray" $(PYTEST_ARGS)

# Prometheus on 127.0.0.1:9090 for a run (installs Debian's prometheus as root when missing): make monitor RUN=runs/smoke
monitor: $(STAMP)
	$(BIN)/python -m orchestrator.monitor $(or $(RUN),runs/default)

bench: $(STAMP)
	$(BIN)/python bench/farm.py $(ARGS)

clean:
	rm -rf runs .pytest_cache
