# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# pip on this machine serves a CPU build of torch 2.13.0 from disk; an unpinned
# torch would download a multi-GB CUDA build.
TORCH  ?= torch==2.13.0

.PHONY: install install-test demo test test-all bench clean sweep-figure gpu-check docs

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PY) -m pip install -q -e ".[test]"
	touch $@

$(VENV)/.installed-docs: $(VENV)/.installed
	$(PY) -m pip install -q -e ".[docs]"
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

demo: $(VENV)/.installed
	$(VENV)/bin/igpt demo --out demo-out --overwrite

# The whole suite, on every core (pytest-xdist; about 9 minutes on 2 cores). Cases marked `slow` (none at present)
# are left to `make test-all`.
test: $(VENV)/.installed-test
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n auto --dist worksteal -m "not slow"

test-all: $(VENV)/.installed-test
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n auto --dist worksteal

# The docs site (mkdocs-material) into site/: guides from docs/, the command reference generated
# from the typer app, the API reference from docstrings; any warning is an error.
docs: $(VENV)/.installed-docs
	rm -rf docs/reference/cli
	$(PY) docs/tools/cli_reference.py docs/reference/cli
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet

clean:
	rm -rf $(VENV) demo-out .pytest_cache igpt-demo.png site docs/reference/cli

# How the shipped model (igpt_cli/assets/igpt-cifar8) was made: CIFAR-10 train at 8x8,
# 2,400 steps of 128 on this 2-core CPU (~70 min), exported as fp16 safetensors.
SHARED ?= ../shared/data
shipped-model: $(VENV)/.installed
	mkdir -p runs
	$(VENV)/bin/igpt quantize $(SHARED)/cifar10-jpeg.tar --split train --size 8 -o runs/cifar8-train.h5 --overwrite
	$(VENV)/bin/igpt quantize $(SHARED)/cifar10-jpeg.tar --split test --size 8 -o runs/cifar8-test.h5 --overwrite
	$(VENV)/bin/igpt train runs/cifar8-train.h5 --val runs/cifar8-test.h5 -o runs/igpt-cifar8 \
		--depth 8 --width 192 --heads 6 --steps 2400 --batch-size 128 --lr 2e-3 --warmup 200 \
		--checkpoint-every 100 --eval-every 100 --seed 0
	$(PY) -m igpt_cli.export runs/igpt-cifar8 igpt_cli/assets/igpt-cifar8 --overwrite

# How docs/guides/sweeps.md's "Does generating better mean representing better?" was made: the shipped recipe
# and a 4x128 family, checkpoints kept at log-spaced steps, swept on seeded CIFAR-10 subsets
# (about 50 + 15 min of training and 2 min of sweep on 2 CPU cores).
SAVE_AT ?= 50,100,200,400,800,1200,1600,2000,2400
RECIPE  := --steps 2400 --batch-size 128 --lr 2e-3 --warmup 200 --checkpoint-every 100 --eval-every 100 --seed 0
sweep-figure: $(VENV)/.installed
	mkdir -p runs docs/sweep
	$(VENV)/bin/igpt quantize $(SHARED)/cifar10-jpeg.tar --split train --size 8 -o runs/cifar8-train.h5 --overwrite
	$(VENV)/bin/igpt quantize $(SHARED)/cifar10-jpeg.tar --split test --size 8 -o runs/cifar8-test.h5 --overwrite
	$(VENV)/bin/igpt quantize $(SHARED)/cifar10-jpeg.tar --split train --size 8 --limit-per-class 300 --shuffle --seed 0 -o runs/cifar8-train3k.h5 --overwrite
	$(VENV)/bin/igpt quantize $(SHARED)/cifar10-jpeg.tar --split test --size 8 --limit-per-class 100 --shuffle --seed 0 -o runs/cifar8-test1k.h5 --overwrite
	$(VENV)/bin/igpt train runs/cifar8-train.h5 --val runs/cifar8-test.h5 -o runs/sweep-cifar8 --depth 8 --width 192 --heads 6 $(RECIPE) --save-at $(SAVE_AT)
	$(VENV)/bin/igpt train runs/cifar8-train.h5 --val runs/cifar8-test.h5 -o runs/sweep-cifar8-small --depth 4 --width 128 --heads 4 $(RECIPE) --save-at $(SAVE_AT)
	$(VENV)/bin/igpt sweep '8x192=runs/sweep-cifar8' '4x128=runs/sweep-cifar8-small' --train runs/cifar8-train3k.h5 --test runs/cifar8-test1k.h5 -o runs/sweep-final
	cp runs/sweep-final/sweep.csv runs/sweep-final/sweep.json runs/sweep-final/*.png docs/sweep/

# Every GPU path on one CUDA device, one table (docs/guides/gpu.md); on a machine without
# CUDA it says so and exits 0. GPU_CHECK_ARGS: e.g. --data /path/to/cifar10-jpeg.tar --json out.json
GPU_CHECK_ARGS ?=
gpu-check: $(VENV)/.installed-test
	$(PY) bench/gpu_check.py $(GPU_CHECK_ARGS)
