# The two set-up commands of the README:
#   make demo   install cometserve and its shipped assets, then quantize + generate (CPU or GPU)
#   make test   install with test dependencies, then run the test suite
PYTHON ?= python3
# A CPU machine without torch gets this pinned build; an installed torch (CUDA or not) is kept.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install install-dev assets demo test

install:
	$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install -q "$(TORCH_SPEC)"
	$(PYTHON) -m pip install -q -e .
	$(MAKE) assets

install-dev:
	$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install -q "$(TORCH_SPEC)"
	$(PYTHON) -m pip install -q -e ".[dev]"
	$(MAKE) assets

assets:
	PYTHON=$(PYTHON) bash scripts/setup_assets.sh

demo: install
	$(PYTHON) -m cometserve.cli demo

test: install-dev
	$(PYTHON) -m pytest -q
