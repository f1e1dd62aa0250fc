# The README's quick start: `make demo` and `make test`, each from a fresh clone.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: demo test lint setup clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -e '.[dev,faiss]'
	touch $(STAMP)

# the demo renders its data from Debian font packages: install the missing ones (as root, or
# with sudo), then run the main job
demo: $(STAMP)
	@missing=$$($(BIN)/python -c "from softtriple.data.builtin.glyphs import missing_packages; \
	print(' '.join(missing_packages()))"); \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then sudo=""; elif command -v sudo >/dev/null; then sudo=sudo; \
	  else echo "make demo needs: apt-get install $$missing (as root)"; exit 1; fi; \
	  echo "installing $$missing"; \
	  DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -q $$missing >/dev/null || \
	  { $$sudo apt-get update -q >/dev/null && \
	    DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -q $$missing >/dev/null; }; \
	fi
	$(BIN)/softtriple demo

test: $(STAMP)
	$(BIN)/pytest
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/mypy

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
