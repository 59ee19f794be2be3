# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# pip on this machine serves a CPU build of torch 2.13.0 from disk; an unpinned
# torch would download a multi-GB CUDA build.
TORCH  ?= torch==2.13.0

.PHONY: install install-test demo test test-all bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PY) -m pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

demo: $(VENV)/.installed
	$(VENV)/bin/igpt demo --out demo-out --overwrite

# The whole suite (about 4 minutes on 2 cores). Cases marked `slow` (none at present)
# are left to `make test-all`.
test: $(VENV)/.installed-test
	$(PY) -m pytest -q -m "not slow"

test-all: $(VENV)/.installed-test
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) demo-out .pytest_cache igpt-demo.png

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
