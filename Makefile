# Two set-up commands on a fresh machine: `make train` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
RECIPE ?= recipes/gpt-cpu.toml
PYTEST_ARGS ?=

.PHONY: setup test train bench clean

setup: $(STAMP)

# torch first, pinned, so pip takes the local CPU wheel here (and the normal build elsewhere)
# and never resolves a CUDA build as a dependency of something else.
# setuptools always warns "Editable installation" for an editable install whose package-dir maps a
# folder elsewhere (plugins/ -> toolkit.plugins): a notice about that layout, which pip relays; filtered by its text.
$(STAMP): pyproject.toml
	@test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	PYTHONWARNINGS='ignore:Editable installation' $(BIN)/python -m pip install -q -e '.[dev]'
	@touch $(STAMP)

# DeepSpeed's op builds and inductor's kernels cached in this checkout's venv: never a lock or a
# half-written kernel left in a shared cache by another checkout's killed run
test: export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/$(VENV)/torch-extensions
test: export TORCHINDUCTOR_CACHE_DIR ?= $(CURDIR)/$(VENV)/inductor-cache
test: setup
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# OpenMP threads that sleep instead of spinning while they wait: on a CPU other programs also
# use, spinning threads wait for descheduled ones and a step takes ~10x longer (measured on 2 cores)
train: setup
	OMP_WAIT_POLICY=$${OMP_WAIT_POLICY:-PASSIVE} $(BIN)/playattention train $(RECIPE)

bench: setup
	$(BIN)/python bench/bench.py $(RECIPE)

clean:
	rm -rf $(VENV) build *.egg-info
