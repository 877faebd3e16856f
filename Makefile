# Each target creates .venv on first use. torch resolves to the build pinned by this machine's pip constraints.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export WANDB_MODE ?= offline
export WANDB_SILENT ?= true
# setuptools' notice on every editable install of a flat layout ("Please be careful with folders ... same name as
# your package"), by its message only: it is about setuptools' mechanism, not the user's run
EDITABLE_QUIET := PYTHONWARNINGS="ignore:Editable installation"

.PHONY: demo test test-slow bench docs install clean atlas

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(PY)
	$(EDITABLE_QUIET) $(PY) -m pip install --quiet -e '.[dev]'
	touch $@

$(VENV)/.installed-docs: $(VENV)/.installed
	$(EDITABLE_QUIET) $(PY) -m pip install --quiet -e '.[dev,docs]'
	touch $@

$(VENV)/.installed-bench: $(VENV)/.installed
	$(EDITABLE_QUIET) $(PY) -m pip install --quiet -e '.[dev,bench]'
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

# the documentation site, strictly (a broken reference or link fails), into site/; NO_MKDOCS_2_WARNING hides
# Material's banner about its successor (nothing about the site)
docs: $(VENV)/.installed-docs
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict

bench: $(VENV)/.installed-bench
	for script in benchmarks/bench_*.py; do echo "== $$script"; $(PY) $$script || exit 1; done

clean:
	rm -rf $(VENV) runs wandb lightning_logs site
