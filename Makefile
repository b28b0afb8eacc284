# Set-up and everyday commands. `make demo` and `make test` do all set-up on a fresh machine.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
RUN_DIR ?= runs/digits

.PHONY: demo test test-all lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@ $(VENV)/.installed

# the demo scores its EMA at steps 175, 350, 525 and 700 (200 samples each, ~12% of its time): report.html draws quality beside the loss
demo: $(VENV)/.installed
	$(BIN)/difftrain train digits run_dir=$(RUN_DIR) train.eval_every=175 train.eval_samples=200

test: $(VENV)/.installed-dev
	$(BIN)/python -m pytest -q

test-all: $(VENV)/.installed-dev
	$(BIN)/python -m pytest -q -m ""

$(BIN)/ruff: | $(BIN)/python
	$(BIN)/python -m pip install -q 'ruff>=0.5'

# Lint with the [tool.ruff] rules of pyproject.toml (`ruff check --fix` applies the safe fixes).
lint: $(BIN)/ruff
	$(BIN)/ruff check src tests bench

# Benchmarks with their default settings (about 25 min on 2 idle cores), then the README "Performance" table.
bench: $(VENV)/.installed-dev
	$(BIN)/python bench/train_throughput.py
	$(BIN)/python bench/sample_throughput.py
	$(BIN)/python bench/quality_per_minute.py
	$(BIN)/python bench/report.py

clean:
	rm -rf runs build src/*.egg-info .pytest_cache
