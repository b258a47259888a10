# Two commands set up and run everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
LINTED := csm deployments serve_app tests bench

.PHONY: demo test lint bench venv system-deps

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# Debian packages the tests use (espeak-ng speaks test sentences). CI runs as root on Debian.
system-deps:
	@command -v espeak-ng >/dev/null || { apt-get update -qq && apt-get install -y -qq espeak-ng >/dev/null; }

# The whole app on this machine: http://127.0.0.1:8000 (random `tiny` weights unless MODEL_PATH is set).
demo: $(STAMP) system-deps
	$(VENV)/bin/serve run serve_config.yaml

lint: $(STAMP)
	$(PY) -m ruff check $(LINTED)
	$(PY) -m ruff format --check $(LINTED)

test: $(STAMP) system-deps lint
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) bench/engine.py
	$(PY) bench/codec.py --threads 1
	$(PY) bench/serve.py
