# The two commands of the README, each doing its own set-up. Repeated runs reuse the virtual environment.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev,examples]"
	touch $(STAMP)

demo: $(STAMP)  ## the main job: MoCo v2 on the built-in shapes with SaliencyMonitor, ~3-4 min on 2 CPU cores
	$(BIN)/python examples/moco_v2.py --data synthetic --max-steps 150 --batch-size 16 --every-n-steps 25 --output runs

bench: $(STAMP)  ## speed benchmarks (about 10 min on 2 CPU cores)
	$(BIN)/python benchmarks/run_all.py

test: $(STAMP)  ## the whole test suite
	$(BIN)/ruff check tsm_lightning tests examples benchmarks
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) runs .pytest_cache
