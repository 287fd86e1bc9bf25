# Two entry points, each bootstrapping .venv on first use and reusing it afterwards:
#   make test   the test suite
#   make demo   the main job (train, evaluate and draw the embedded demo)
# Besides them:
#   make test-compat TORCH=2.1.2 COMPAT_PYTHON=python3.9   the suite in a side venv
#       (.venv-compat/) with that torch, mmcv 2.1.0 built for it and this package
#       installed as a user installs it; not part of `make test`
#   make wheel   dist/mmtransnext-*.whl, the op compiled for .venv's torch
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
TORCH_VERSION ?= 2.13.0
# Parallel C++ jobs for the extension builds (mmcv's and ours).
export MAX_JOBS ?= 2

STAMP := $(VENV)/.mmtransnext-deps
EXT_STAMP := $(VENV)/.mmtransnext-ext

.PHONY: venv test demo demo-seg ext clean test-compat wheel device-wheels device-check

venv: $(EXT_STAMP)

# Third-party dependencies: slow the first time (mmcv compiles its ops, ~6 min on
# 2 cores), then served from pip's wheel cache.
$(STAMP): requirements/runtime.txt requirements/build.txt requirements/tests.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# Keep a torch the user already has (a CUDA build, say); pin only where none is present.
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q torch==$(TORCH_VERSION)
	$(PIP) install -q -r requirements/build.txt
	$(PY) -c "import mmcv.ops" 2>/dev/null || \
		MMCV_WITH_OPS=1 $(PIP) install --no-build-isolation mmcv==2.1.0
	$(PIP) install -q -r requirements/runtime.txt -r requirements/tests.txt
	# Triton runs the fused GPU kernels under its CPU interpreter in the tests; a CUDA torch
	# ships the triton it was built with, which must stay.
	$(PY) -c "import triton" 2>/dev/null || $(PIP) install -q triton==3.9.0
	touch $@

# Our package, editable, with its compiled op (rebuilt when a kernel source changes).
$(EXT_STAMP): $(STAMP) setup.py $(wildcard csrc/*.cpp csrc/*.h csrc/*.cu csrc/*/*.cpp csrc/*/*.cu csrc/*/*.h)
	$(PIP) install -q --no-build-isolation --no-deps -e .
	touch $@

ext: $(EXT_STAMP)

# Two pytest-xdist workers, tests handed out as workers free up (most of the suite's time
# is single-threaded: Dynamo tracing, Triton's interpreter, nvcc, tool subprocesses).
TEST_WORKERS ?= 2
test: $(EXT_STAMP)
	$(PY) -m pytest tests -q -rs -n $(TEST_WORKERS) --dist worksteal

demo: $(EXT_STAMP)
	$(PY) tools/run_demo.py det

demo-seg: $(EXT_STAMP)
	$(PY) tools/run_demo.py seg

TORCH ?= $(TORCH_VERSION)
COMPAT_PYTHON ?= $(PYTHON)
test-compat:
	tools/test_compat.sh $(TORCH) $(COMPAT_PYTHON)

wheel: $(STAMP)
	$(PIP) wheel --no-build-isolation --no-deps -w dist .

# .whl/: the OpenMMLab wheels (Python 3.12) and mmcv's source that tools/device_check.sh
# installs on a GPU machine without network; CUDA_TORCH_PYTHON=<python3.12 with the GPU
# machine's torch> also prebuilds mmcv's CUDA ops there (tools/device_wheels.sh).
device-wheels:
	PYTHON=$(PYTHON) CUDA_TORCH_PYTHON=$(CUDA_TORCH_PYTHON) tools/device_wheels.sh

# The CUDA check on a GPU machine, report in $(OUT)/device_check.md (tools/device_check.sh).
OUT ?= device_check_out
device-check:
	bash tools/device_check.sh $(OUT)

clean:
	rm -rf build dist *.egg-info mmtransnext/*.so work_dirs
