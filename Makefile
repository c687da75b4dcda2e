# compress-order: every target builds its own virtualenv on first use.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip
STAMP  := $(VENV)/.installed
ARGS   ?=

export PIP_CONSTRAINT := $(CURDIR)/constraints.txt

.PHONY: help install run test test-slow bench clean

help:  ## list targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)  ## create .venv and install the package with test tools

run: $(STAMP)  ## run the default experiment offline and print the result table (ARGS="bits=4 ...")
	$(BIN)/compress-order run $(ARGS)

test: $(STAMP)  ## fast test suite
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)  ## slow tests (shipped models, quality checks)
	$(BIN)/python -m pytest -q -m slow

bench: $(STAMP)  ## benchmarks under scripts/ (stage time/memory, backend latency, grid sharing)
	$(BIN)/python scripts/bench_stages.py
	$(BIN)/python scripts/bench_latency.py
	$(BIN)/python scripts/bench_sweep.py

clean:  ## remove the virtualenv and outputs
	rm -rf $(VENV) outputs/* multirun
