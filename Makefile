# Two commands set up and run everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

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

demo: $(STAMP)
	$(PY) -m csm.cli generate --preset tiny --streams 4 --frames 24

lint: $(STAMP)
	$(PY) -m ruff check csm tests bench
	$(PY) -m ruff format --check csm tests bench

test: $(STAMP) system-deps lint
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) bench/engine.py
	$(PY) bench/codec.py --threads 1
