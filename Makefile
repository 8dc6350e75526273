# Every target runs inside the repo-local .venv that `make install` builds (idempotent).
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# torch is not pinned in setup.cfg (CUDA users bring their own build). A fresh venv gets this one;
# override with `make install TORCH=torch` for the newest build from the index.
TORCH  ?= torch==2.13.0
# Optional extras beside the test tools: e.g. `make install EXTRAS=dev,ray,browser`.
EXTRAS ?= dev
comma  := ,
STAMP  := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))
PYTEST := $(PY) -m pytest

.PHONY: install test test-slow bench demo eval eval-modes train-default clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q "$(TORCH)"
	@# Pin whatever torch is now in the venv, so nothing below swaps it for another build.
	$(PY) -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > $(VENV)/constraints.txt
	@# CLIP's BPE vocabulary comes from openai-clip (ftfy, regex, tqdm: no torchvision).
	$(PIP) install -q -c $(VENV)/constraints.txt -e ".[$(EXTRAS)]"
	@# Test reference only: k-diffusion's sampling.py/external.py need torch, scipy, torchsde and
	@# torchdiffeq (in [dev]); its declared deps (torchvision, wandb, kornia, ...) are not wanted.
	$(PIP) install -q --no-deps k-diffusion==0.1.1.post1
	@# Test reference only: open_clip's own API checks our open_clip checkpoint conversion
	@# (ldm_engine/clip_open_clip.py); pure Python, its torchvision/timm are not wanted.
	$(PIP) install -q --no-deps open_clip_torch==3.3.0
	touch $@

test: install
	$(PYTEST) -q

# The slow tests include the web UI in a real browser (Debian's Chromium: installed here when
# apt-get can) and Ray Serve replicas; those skip, saying why, where their parts are missing.
test-slow:
	$(MAKE) install EXTRAS=dev,ray,browser
	test -x /usr/bin/chromium || (command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
		apt-get update -qq && apt-get install -y -qq chromium) || true
	$(PYTEST) -q -m slow

# The whole matrix (256 and 512 px, 10 and 20 steps, six engines, each alone on the CPU) takes
# about 2 h on 2 cores; `$(PY) -m ldm_engine.apps.bench --help` runs parts of it.
bench: install
	$(PY) -m ldm_engine.apps.bench --out BENCHMARKS.md

# Generates demo.png from a prompt with the bundled model (ldm_engine/models/default).
demo: install
	$(VENV)/bin/ldm generate "a yellow triangle in the centre, green background" \
		--out demo.png --seed 0 --steps 30 --guidance 5
	@echo "wrote demo.png"

# Held-out prompt accuracy of the bundled model, with and without guidance.
eval: install
	$(VENV)/bin/ldm eval --grid docs/heldout-grid.png

# Inpainting, text-diff edits and the hires fix on the bundled model, graded by the shapes
# oracle (train/mode_eval.py), and one grid per image mode: docs/mode-eval.md, docs/modes-*.png.
eval-modes: install
	$(PY) -m train.mode_eval --out docs/mode-eval.md --grids docs/

# Trains CLIP, VAE and UNet from scratch on the shapes world (2 CPU cores, < 60 min) and writes
# the bundled model; the log goes to runs/default/train.log. The only command that writes into
# ldm_engine/models/default: training refuses a model_dir there unless the command line names it.
train-default: install
	mkdir -p runs/default
	PYTHONUNBUFFERED=1 $(PY) -m train train/configs/default.yaml \
		model_dir=ldm_engine/models/default 2>&1 | tee runs/default/train.log

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache

# The load test of `ldm serve` on the bundled model (batching off, on, and over capacity, each on
# its own fresh server subprocess), appended to BENCHMARKS.md with its command.
.PHONY: bench-serve
bench-serve: install
	$(PY) -m ldm_engine.apps.server.loadtest --suite --requests 200 --concurrency 16 --steps 8 \
		--append BENCHMARKS.md
