# The README's two commands: `make demo` and `make test`. Both create .venv and install into it.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# pip's choice of torch: set TORCH='torch==2.13.0' (a CPU wheel here) to skip the multi-GB CUDA build.
TORCH  ?=

.PHONY: demo test docs bench configs-table tensorboard clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# gradexp itself (what the demo needs)
$(VENV)/.installed: pyproject.toml setup.py gradexp/probes/_probes.c | $(BIN)/python
	$(BIN)/python -m pip install --quiet $(TORCH) -e .
	@touch $@

# plus pytest, Ray (the sweep's cluster executor is tested against a local instance), Lightning and
# transformers (the callbacks in gradexp/lightning.py and gradexp/huggingface.py), wandb (the
# benchmark's peers, smoke-tested), and MkDocs (the documentation site, built by `make test`)
$(VENV)/.installed-dev: pyproject.toml $(VENV)/.installed
	$(BIN)/python -m pip install --quiet $(TORCH) -e '.[dev,ray,lightning,huggingface,bench,docs]'
	@touch $@

demo: $(VENV)/.installed
	$(BIN)/gradexp run configs/deep_sigmoid.yaml

# the layers contract, the docs site, then the suite (its summary is the last line); two workers on two
# cores, one torch thread each: two OpenMP teams on two cores spin-wait on each other
test: $(VENV)/.installed-dev
	$(BIN)/lint-imports --no-cache
	$(MAKE) docs
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -n 2 -q

# MkDocs alone, for `make docs` without the test extras
$(VENV)/.installed-docs: pyproject.toml $(VENV)/.installed
	$(BIN)/python -m pip install --quiet $(TORCH) -e '.[docs]'
	@touch $@

# the documentation site, strictly: a broken link, a missing page or anchor fails the build
docs: $(VENV)/.installed-docs
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir build/site

bench: $(VENV)/.installed-dev
	$(BIN)/python bench/overhead.py

configs-table: $(VENV)/.installed
	$(BIN)/python bench/configs.py

tensorboard: $(VENV)/.installed
	$(BIN)/tensorboard --logdir runs

clean:
	rm -rf $(VENV) *.egg-info
