# Two commands a new user needs: `make run` (the main job) and `make test` (the test suite).
#   make run STEPS=200     a shorter main job (the default is 600 steps)
#   make run PYTHON=...    another interpreter
PYTHON ?= python3
PIP := $(PYTHON) -m pip
STEPS ?= 600

.PHONY: install install-test run tour test bench

# Pin torch 2.13.0 only when no torch is installed: an unpinned torch pulls a multi-GB CUDA
# build on CPU machines, while a GPU machine keeps the CUDA build it already has.
# The main job needs only the export extra (ONNX, ONNX Runtime); the tests need the test extra.
install:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install -q torch==2.13.0
	@$(PIP) install -q -e ".[export]"

# Where node and npm are installed, also the JavaScript client's pinned packages (tools/js/package-lock.json),
# which tests/test_js_client.py needs; reinstalled only when the lockfile changed. ONNXRUNTIME_NODE_INSTALL=skip:
# the CPU binaries ship in the package, and its install script would fetch CUDA ones.
install-test:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install -q torch==2.13.0
	@$(PIP) install -q -e ".[test]"
	@if command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1 && \
	    ! [ tools/js/node_modules/.package-lock.json -nt tools/js/package-lock.json ]; then \
	    cd tools/js && ONNXRUNTIME_NODE_INSTALL=skip npm ci --no-audit --no-fund --loglevel=error; fi

# The main job: train the default model (mega) on the default task (byte-level LM on the Python
# standard library) for STEPS steps, evaluate, checkpoint, print a summary and a sample, then
# export it to ONNX and compare ONNX Runtime with eager (agreement and latency).
run: install
	@dir=runs/quickstart/$$(date +%Y%m%d-%H%M%S); \
	$(PYTHON) -m seqmix train train=quickstart train.max_steps=$(STEPS) train.out_dir=$$dir && \
	$(PYTHON) -m seqmix export checkpoint=$$dir format=onnx

tour: install
	$(PYTHON) -m seqmix tour

# One single-threaded worker per usable CPU (tests/conftest.py counts them; pytest-xdist alone counts physical
# cores, one on a machine of two hyperthreads): tools/perf/threads.md shows why single-threaded.
test: install-test
	$(PYTHON) -m pytest -q -n auto --dist loadgroup

# The operator sweep (conf/bench/operators.yaml): every mixer and compute path, eager, with the speed targets.
bench: install
	$(PYTHON) -m seqmix bench bench=operators
