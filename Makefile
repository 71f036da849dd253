# The two set-up commands of the README: `make serve` and `make test`.
# Both create .venv/ in the repository and install what they need when it is missing.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
PORT   ?= 3000
PYTEST_ARGS ?=

.PHONY: serve test lint bench-train clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# A stamp per extra, redone when pyproject.toml changes.
$(VENV)/.serve-installed: pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e ".[serve]"
	touch $@

$(VENV)/.train-installed: pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e ".[train,dev]"
	touch $@ $(VENV)/.serve-installed

# Settings: EMBEDSERVE_* environment variables (docs/serving.md, "Configuration"), e.g.
#   EMBEDSERVE_DEVICE=cpu EMBEDSERVE_INDEX=indexes/imagenette make serve PORT=3000
serve: $(VENV)/.serve-installed
	$(VENV)/bin/bentoml serve embedserve.service:EmbedService --port $(PORT)

test: $(VENV)/.train-installed
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(VENV)/.train-installed
	$(VENV)/bin/ruff check embedserve training tests benchmarks
	$(VENV)/bin/ruff format --check embedserve training tests benchmarks

bench-train: $(VENV)/.train-installed
	$(PY) -m benchmarks.train_throughput

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
