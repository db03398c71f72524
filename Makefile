# The two commands of the README, each doing its own set-up. Repeated runs reuse the virtual environment.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo demo-shortcut test bench seed-sweep matrix clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev,examples]"
	touch $(STAMP)

demo: $(STAMP)  ## the main job: SimCLR with background swap on textured objects, SaliencyMonitor watching
	$(BIN)/python examples/simclr.py --output runs

demo-shortcut: $(STAMP)  ## the same run without background swap, into the same runs/: the model learns the clutter
	$(BIN)/python examples/simclr.py --output runs --no-background-swap

bench: $(STAMP)  ## speed benchmarks (about 8 min on 2 CPU cores)
	$(BIN)/python benchmarks/run_all.py

seed-sweep: $(STAMP)  ## the demo for seeds 0-4, with and without background swap (about 50 min; resumable)
	$(BIN)/python benchmarks/seed_sweep.py --seed-major --runs runs/sweep

matrix: $(STAMP)  ## the SSL method matrix: 8 methods x 3 seeds + no-swap controls (hours of CPU; resumable)
	$(BIN)/python benchmarks/ssl_matrix.py --runs runs/sweep

test: $(STAMP)  ## ruff, mypy over the package, the whole test suite
	$(BIN)/ruff check tsm_lightning tests examples benchmarks
	$(BIN)/mypy tsm_lightning
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) runs .pytest_cache
