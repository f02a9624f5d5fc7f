# Two commands for a newcomer: `make demo` and `make test`. Both set everything up from nothing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch is pinned exactly: 2.13.0 is the local CPU build; any other spec pulls CUDA packages.
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup data demo test lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

data:
	@bash scripts/ensure_fmnist.sh

demo: setup data
	$(PY) -m wildsight demo

test: setup data
	$(PY) -m pytest -q -p no:cacheprovider

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

clean:
	rm -rf $(VENV) runs
