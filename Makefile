# The README's two commands: `make demo` and `make test`. Both create .venv and install into it.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# pip's choice of torch: set TORCH='torch==2.13.0' (a CPU wheel here) to skip the multi-GB CUDA build.
TORCH  ?=

.PHONY: demo test bench configs-table tensorboard clean

$(BIN)/gradexp: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH) -e '.[dev]'
	@touch $@

demo: $(BIN)/gradexp
	$(BIN)/gradexp run configs/deep_sigmoid.yaml

test: $(BIN)/gradexp
	# two workers on two cores, one thread each: two OpenMP teams on two cores spin-wait on each other
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -n 2 -q

bench: $(BIN)/gradexp
	$(BIN)/python bench/overhead.py

tensorboard: $(BIN)/gradexp
	$(BIN)/tensorboard --logdir runs

clean:
	rm -rf $(VENV) *.egg-info

configs-table: $(BIN)/gradexp
	$(BIN)/python bench/configs.py
