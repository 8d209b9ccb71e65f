# Two commands for a fresh machine: `make demo` (the main job) and `make test`.
# Each one sets up what it needs: a .venv with the CPU build of torch, the package, and Fashion-MNIST.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
FMNIST_DIR ?= /usr/share/datasets/fashion-mnist
THREADS ?= 2
COMPARE ?= 0
PRESET ?=
PYTEST_ARGS ?=

.PHONY: setup data test test-fast demo bench clean-venv

setup: $(VENV)/.stamp

$(VENV)/.stamp: pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; install Python 3.11 or run 'make PYTHON=python3 ...'"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[test,latent]"
	touch $@

data:
	@bash scripts/ensure_fmnist.sh "$(FMNIST_DIR)"

test: setup data
	DISTREWARD_THREADS=$(THREADS) $(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: setup data
	DISTREWARD_THREADS=$(THREADS) $(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

demo: setup data
	$(VENV)/bin/distreward demo --threads $(THREADS) $(if $(filter 1,$(COMPARE)),--compare,) $(if $(PRESET),--config $(PRESET),)

bench: setup data
	$(PY) benchmarks/frechet.py

clean-venv:
	rm -rf $(VENV)
