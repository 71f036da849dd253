# The two set-up commands of the README: `make serve` and `make test`.
# Both create .venv/ in the repository and install what they need when it is missing.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
PORT   ?= 3000
PYTEST_ARGS ?=

.PHONY: serve test browser lint bench-train clean

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

test: $(VENV)/.train-installed browser
	$(PY) -m pytest $(PYTEST_ARGS)

# The search page's browser test (tests/embedserve/test_search_page.py) drives Debian's
# chromium through chromium-driver: installed with apt-get when `chromium` is missing (as root,
# or through sudo without a password). Where that cannot be done, the test skips and says why.
APT_GET = env DEBIAN_FRONTEND=noninteractive apt-get -y -q -o Dpkg::Use-Pty=0
browser:
	@if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ]; then sudo=""; elif sudo -n true 2>/dev/null; then sudo="sudo -n"; \
	  else echo "chromium is missing and apt-get needs root: the browser test will skip"; exit 0; fi; \
	  echo "installing chromium and chromium-driver (apt-get) for the browser test"; \
	  $$sudo $(APT_GET) install chromium chromium-driver >/dev/null 2>&1 || \
	  { $$sudo $(APT_GET) update >/dev/null 2>&1 && \
	    $$sudo $(APT_GET) install chromium chromium-driver >/dev/null; } || \
	  echo "could not install chromium with apt-get: the browser test will skip"; \
	fi

lint: $(VENV)/.train-installed
	$(VENV)/bin/ruff check embedserve training tests benchmarks
	$(VENV)/bin/ruff format --check embedserve training tests benchmarks

bench-train: $(VENV)/.train-installed
	$(PY) -m benchmarks.train_throughput

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
