# Each target creates .venv on first use. torch resolves to the build pinned by this machine's pip constraints.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export WANDB_MODE ?= offline
export WANDB_SILENT ?= true

.PHONY: demo test test-slow bench install clean atlas

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

$(VENV)/.installed-bench: $(VENV)/.installed
	$(PY) -m pip install --quiet -e '.[dev,bench]'
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(PY) train.py fit --config configs/shortcut/harmonized_lipschitz.yaml

# a concept atlas of EfficientNet-Lite0 on the photos that ship with installed packages (docs/atlas.md)
atlas: $(VENV)/.installed
	$(PY) -m explain.atlas.photos data/atlas_photos
	$(PY) -m explain.atlas --config configs/atlas/efficientnet_lite0.yaml
	@echo "open atlas/efficientnet_lite0/index.html"

test: $(VENV)/.installed
	$(PY) -m pytest -q

test-slow: $(VENV)/.installed
	$(PY) -m pytest -q -m slow

bench: $(VENV)/.installed-bench
	for script in benchmarks/bench_*.py; do echo "== $$script"; $(PY) $$script || exit 1; done

clean:
	rm -rf $(VENV) runs wandb lightning_logs
