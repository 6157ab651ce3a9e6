# The two commands of the README. Both install what they need first (CPU torch pinned:
# an unpinned torch pulls gigabytes of CUDA packages).
PYTHON ?= python3
TORCH ?= torch==2.13.0

.PHONY: install test test-unit demo lint

install:
	$(PYTHON) -m pip install -q $(TORCH)
	$(PYTHON) -m pip install -q -e ".[test]"

test: install
	$(PYTHON) -m ruff check src tests bench
	$(PYTHON) -m pytest -p no:cacheprovider

test-unit:
	$(PYTHON) -m pytest -p no:cacheprovider -m unit

demo: install
	$(PYTHON) -m sftscope demo --out sftscope-demo

lint:
	$(PYTHON) -m ruff check src tests bench
