# dqfast: `make demo` (the main job) and `make test` (the tests) each build .venv and install
# what they need; nothing else is assumed to be installed.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check
STAMP  := $(VENV)/.installed

.PHONY: demo test lint format bench bench-gpu clean

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
test: $(STAMP) lint
	OMP_NUM_THREADS=1 TRITON_INTERPRET=1 DQFAST_TEST_FLEX=1 $(PY) -m pytest tests -q -ra -n 2
	$(PY) -m pytest bench -q -ra --benchmark-disable-gc --benchmark-min-rounds=1 \
		--benchmark-max-time=0.05 --benchmark-warmup=off -p no:cacheprovider

bench: $(STAMP)
	$(PY) -m pytest bench -ra --benchmark-group-by=group --benchmark-columns=min,median,mean,ops

clean:
	rm -rf $(VENV) .pytest_cache .benchmarks .ruff_cache *.egg-info
