# `make test`: create (or reuse) .venv, install the package with its test extra, run the suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
# k-diffusion, the samplers' test-only reference, without its dependencies: they pull dctorch, which pins numpy<2 (a
# downgrade other packages break on), and wandb, accelerate, clean-fid, clip. The tests load only its sampling,
# external and layers modules (tests/sampling/conftest.py); what those import (scipy, torchdiffeq, torchsde, einops,
# and dctorch, itself installed without its numpy pin) is in the test extra of setup.py or installed here.
KDIFFUSION_PINS := k-diffusion==0.1.1.post1 dctorch==0.1.2
PYTEST_ARGS ?= -n 2

.PHONY: install install-core test bench demo clean

# Two stamps: the package alone (what `make demo` needs), then its test extra and the reference samplers on top.
$(VENV)/.installed-core: setup.py Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PINS)
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.installed: $(VENV)/.installed-core
	$(PY) -m pip install -q -e ".[test]"
	$(PY) -m pip install -q --no-deps $(KDIFFUSION_PINS)
	touch $@

install: $(VENV)/.installed

install-core: $(VENV)/.installed-core

test: install
	$(PY) -m pytest $(PYTEST_ARGS) tests

bench: install
	$(PY) scripts/benchmark_unet.py

# `make demo`: train the shapes autoencoder, then the text-conditioned shapes LDM, with main.py on CPU; write
# outputs/demo/grid.png and print the caption adherence and the autoencoder PSNR (see README, Demo).
# DEMO_ARGS passes flags to scripts/demo.py, e.g. DEMO_ARGS="--ldm-minutes 12".
DEMO_ARGS ?=
DEMO_START := $(shell date +%s)
demo: install-core
	@echo "time setup: $$(( $$(date +%s) - $(DEMO_START) )) s"
	@$(PY) scripts/demo.py $(DEMO_ARGS); status=$$?; \
	echo "time in all (setup included): $$(( $$(date +%s) - $(DEMO_START) )) s"; exit $$status

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
