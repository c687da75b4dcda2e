# compress-order: every target builds its own virtualenv on first use.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip
STAMP  := $(VENV)/.installed
ARGS   ?=

export PIP_CONSTRAINT := $(CURDIR)/constraints.txt

.PHONY: help install data run test test-slow bench clean

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

# data=wikipedia / data=news, prepared once from the gensim wheel's test data (scripts/get_wikipedia.py)
WIKI := $(or $(COMPRESS_ORDER_CACHE),$(HOME)/.cache/compress-order)/wikipedia/ATTRIBUTION.md
$(WIKI): | $(STAMP)
	$(BIN)/python scripts/get_wikipedia.py

data: $(WIKI)  ## prepare the offline text data sets (wikipedia, news)

# One worker per core (at most 4: each holds its own tiny models); a module's tests stay on one worker so its
# fixtures are built once. `pytest tests/test_x.py` alone still runs in one process.
test: $(STAMP) $(WIKI)  ## fast test suite
	$(BIN)/python -m pytest -q -n auto --maxprocesses 4 --dist loadfile --durations=15

test-slow: $(STAMP)  ## slow tests (shipped models, quality checks)
	$(BIN)/python -m pytest -q -m slow

bench: $(STAMP)  ## benchmarks under scripts/ (stage time/memory, backend latency, grid sharing)
	$(BIN)/python scripts/bench_stages.py
	$(BIN)/python scripts/bench_latency.py
	$(BIN)/python scripts/bench_sweep.py

clean:  ## remove the virtualenv and outputs
	rm -rf $(VENV) outputs/* multirun

# Offline GPU nodes: `make wheelhouse` where the package index is reachable, then `make gpu-check` on the node
# (with the node's own Python and torch: GPU_PYTHON=/path/to/python).
WHEELHOUSE_ARGS ?=
GPU_PYTHON ?= $(PYTHON)

.PHONY: wheelhouse gpu-check gpu-reference

wheelhouse: $(STAMP)  ## wheels for an offline GPU node into wheelhouse/ (WHEELHOUSE_ARGS="--python-version 3.10 --freeze F")
	$(BIN)/python scripts/wheelhouse.py $(WHEELHOUSE_ARGS)

gpu-check:  ## on a GPU node: install wheelhouse/ privately, run the CUDA checks, write gpu_check/report.md
	$(GPU_PYTHON) scripts/gpu_check.py $(ARGS)

gpu-reference: $(STAMP)  ## regenerate the CPU reference perplexities of gpu-check (tests/data/gpu_reference.json)
	$(BIN)/python scripts/gpu_reference.py
