# Two commands a new user needs: `make run` (main job) and `make test` (the test suite).
PYTHON ?= python3
PIP := $(PYTHON) -m pip

.PHONY: install run tour test bench

# Pin torch 2.13.0 only when no torch is installed: an unpinned torch pulls a multi-GB CUDA
# build on CPU machines, while a GPU machine keeps the CUDA build it already has.
install:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install -q torch==2.13.0
	@$(PIP) install -q -e ".[test]"

# The main job: train the default model (mega) on the default task (byte-level LM on the Python
# standard library) for a few minutes, evaluate, checkpoint, print a summary and a sample, then
# export it to ONNX and compare ONNX Runtime with eager (agreement and latency).
run: install
	@dir=runs/quickstart/$$(date +%Y%m%d-%H%M%S); \
	$(PYTHON) tools/train.py train=quickstart train.out_dir=$$dir && \
	$(PYTHON) tools/export.py checkpoint=$$dir format=onnx

tour: install
	$(PYTHON) tools/demo.py

test: install
	$(PYTHON) -m pytest -q

bench: install
	$(PYTHON) tools/bench_mixers.py --out bench_results
