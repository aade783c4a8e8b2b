# dqfast: `make demo` (the main job) and `make test` (the tests) each build .venv and install
# what they need; nothing else is assumed to be installed.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check
STAMP  := $(VENV)/.installed

.PHONY: demo test lint format bench bench-gpu sm90-report gpu-check clean

$(STAMP): pyproject.toml Makefile constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch is pinned for the dev venv (a local CPU wheel exists for exactly this version);
	# pyproject keeps a loose range for users. Every install goes through constraints.txt
	# (torch==2.13.0), so no extra can move torch.
	$(PIP) install -q -c constraints.txt "torch==2.13.0"
	$(PIP) install -q -c constraints.txt "triton==3.9.0"
	$(PIP) install -q -c constraints.txt -e ".[test,bench,codec,integrations]"
	# The taming/LDM decoder the drop-in tests patch; its model file needs only torch and numpy
	# (the package's declared dependencies are for its training scripts).
	$(PIP) install -q -c constraints.txt --no-deps "taming-transformers==0.0.1"
	$(PY) -c "import torch; v = torch.__version__.split('+')[0]; assert v == '2.13.0', f'torch moved to {v}'"
	touch $(STAMP)

# The GPU machine's triton (3.6) beside the dev one: make test runs the kernel parity tests and the
# static sm_90 check under it too. There it comes with torch 2.11 (CUDA); torch 2.11's CPU build
# cannot be installed here (only the torch 2.13.0 CPU wheel is served), so this venv pairs triton
# 3.6 with torch 2.13.0 and NumPy >= 2.4, the combination that broke 3.6's interpreter.
VENV36  := .venv-t36
PY36    := $(VENV36)/bin/python
PIP36   := $(PY36) -m pip --disable-pip-version-check
STAMP36 := $(VENV36)/.installed
KERNEL_TESTS := $(sort $(wildcard tests/test_*_kernel.py)) tests/test_sm90_static.py

$(STAMP36): pyproject.toml Makefile constraints.txt
	$(PYTHON) -m venv $(VENV36)
	$(PIP36) install -q -c constraints.txt "torch==2.13.0" "triton==3.6.0" "numpy>=2.4" einops safetensors \
		pillow tqdm pytorch-msssim "pytest>=8" "pytest-xdist>=3"
	$(PIP36) install -q -c constraints.txt --no-deps -e .
	$(PY36) -c "import torch; v = torch.__version__.split('+')[0]; assert v == '2.13.0', f'torch moved to {v}'"
	touch $(STAMP36)

demo: $(STAMP)
	$(PY) -m dqfast demo

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(STAMP)
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

# Kernel parity runs on the CPU through the Triton interpreter; GPU-only cases skip with a reason.
# Two workers of one thread each: the cases are small, so processes beat intra-op threads.
# DQFAST_TEST_FLEX=1 adds FlexAttention (compiled on CPU, ~15 s) as an external oracle of the mask.
test: $(STAMP) $(STAMP36) lint
	OMP_NUM_THREADS=1 TRITON_INTERPRET=1 DQFAST_TEST_FLEX=1 $(PY) -m pytest tests -q -ra -n 2
	OMP_NUM_THREADS=1 TRITON_INTERPRET=1 $(PY36) -m pytest $(KERNEL_TESTS) -q -ra -n 2 -p no:cacheprovider
	$(PY) -m pytest bench -q -ra --benchmark-disable-gc --benchmark-min-rounds=1 \
		--benchmark-max-time=0.05 --benchmark-warmup=off -p no:cacheprovider

bench: $(STAMP)
	$(PY) -m pytest bench -ra --benchmark-group-by=group --benchmark-columns=min,median,mean,ops

# Every kernel x autotune config compiled for sm_90 (no GPU needed) at the bench's headline shapes,
# under the dev triton and the GPU machine's (bench/sm90_report.py; ~10 min per version on 2 cores).
sm90-report: $(STAMP) $(STAMP36)
	OMP_NUM_THREADS=1 $(PY) bench/sm90_report.py --out bench/results/sm90-static.md \
		--json bench/results/sm90-static.json
	OMP_NUM_THREADS=1 $(PY36) bench/sm90_report.py --out bench/results/sm90-static-triton3.6.md \
		--json bench/results/sm90-static-triton3.6.json

# One budgeted run on a GPU machine (<= 8 min; no venv there: the machine's python3 runs it).
gpu-check:
	$(PYTHON) bench/gpu_check.py --out bench/results

clean:
	rm -rf $(VENV) $(VENV36) .pytest_cache .benchmarks .ruff_cache *.egg-info
