# Every target runs inside the repo-local .venv that `make install` builds (idempotent).
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# torch is not pinned in setup.cfg (CUDA users bring their own build). A fresh venv gets this one;
# override with `make install TORCH=torch` for the newest build from the index.
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed
PYTEST := $(PY) -m pytest

.PHONY: install test test-slow bench demo clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q "$(TORCH)"
	@# Pin whatever torch is now in the venv, so nothing below swaps it for another build.
	$(PY) -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > $(VENV)/constraints.txt
	$(PIP) install -q -c $(VENV)/constraints.txt -e ".[dev]"
	@# open_clip_torch pulls torchvision (and timm, which imports it); the index's torchvision is
	@# built against the CUDA torch, and on a CPU-only torch its C ops fail to register, which breaks
	@# `import diffusers` and `accelerate launch`. We only need open_clip's BPE file, so whichever of
	@# the two cannot import is removed.
	$(PY) -c "import torchvision" 2>/dev/null || $(PIP) uninstall -y -q torchvision
	$(PY) -c "import timm" 2>/dev/null || $(PIP) uninstall -y -q timm
	touch $@

test: install
	$(PYTEST) -q

test-slow: install
	$(PYTEST) -q -m slow

bench: install
	$(PY) -m ldm_engine.bench --out BENCHMARKS.md

demo: install
	$(VENV)/bin/ldm generate "a red circle on the left, blue background" --out demo.png --seed 0
	@echo "wrote demo.png"

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
