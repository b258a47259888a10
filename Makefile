# Two commands set up and run everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
LINTED := csm speech deployments serve_app lambda_bridge devtools tests bench infra_cdk docker
FRONTEND := frontend
NPM_STAMP := $(FRONTEND)/node_modules/.installed
CHROMIUM ?= /usr/bin/chromium
INFRA := infra_cdk
INFRA_NPM_STAMP := $(INFRA)/node_modules/.installed

.PHONY: demo test lint bench venv system-deps frontend-deps frontend-build frontend-test browser-deps infra-deps docker-constraints gateway

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# Debian packages the tests use (espeak-ng speaks test sentences). CI runs as root on Debian.
system-deps:
	@command -v espeak-ng >/dev/null || { apt-get update -qq && apt-get install -y -qq espeak-ng >/dev/null; }

# The page's npm packages, exactly as locked; reinstalled when package-lock.json changes.
frontend-deps: $(NPM_STAMP)

$(NPM_STAMP): $(FRONTEND)/package-lock.json
	cd $(FRONTEND) && npm ci --no-audit --no-fund
	touch $(NPM_STAMP)

# frontend/dist: what the ingress serves at / and /assets/.
frontend-build: $(NPM_STAMP)
	cd $(FRONTEND) && npm run build

# Debian's Chromium for the browser tests (Playwright drives it; it never downloads a browser).
browser-deps:
	@test -x $(CHROMIUM) || { apt-get update -qq && apt-get install -y -qq chromium >/dev/null; }

# The page's tests: type-check, unit tests (vitest), then the browser tests (Playwright + Chromium)
# against the real app, which they start with `serve run` on a free loopback port.
frontend-test: $(STAMP) system-deps browser-deps frontend-build
	cd $(FRONTEND) && npm run typecheck
	cd $(FRONTEND) && npm run test:unit
	cd $(FRONTEND) && CHROMIUM_PATH=$(CHROMIUM) npm run test:e2e

# The CDK CLI (`cdk synth` in the tests, `cdk deploy` in the README), exactly as locked.
infra-deps: $(INFRA_NPM_STAMP)

$(INFRA_NPM_STAMP): $(INFRA)/package-lock.json
	cd $(INFRA) && npm ci --no-audit --no-fund
	touch $(INFRA_NPM_STAMP)

# docker/constraints.txt: the image's pins, frozen from this venv (run after changing dependencies).
docker-constraints: $(STAMP)
	$(PY) docker/freeze_constraints.py

# The AWS path on this machine: the API Gateway emulator with the real Lambda handlers in front of
# `make demo`. Run both with the same CSM_TOKEN, CSM_BRIDGE_TOKEN (the bridge's own credential),
# CSM_BRIDGE_CALLBACK_URL=http://127.0.0.1:8766/local and AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing
# (the emulator checks @connections' SigV4 signatures); list ws://127.0.0.1:8765/ in the page's config.json.
gateway: $(STAMP)
	CSM_ALLOW_ANONYMOUS=$${CSM_ALLOW_ANONYMOUS:-1} $(PY) -m devtools.local_gateway --serve-url http://127.0.0.1:8000

# The whole app on this machine: http://127.0.0.1:8000 (random `tiny` weights unless MODEL_PATH is set).
demo: $(STAMP) system-deps frontend-build
	@test -n "$$CSM_TOKEN$$CSM_TOKENS" || echo "make demo: no CSM_TOKEN set, so anyone who reaches port 8000 may talk to it (CSM_ALLOW_ANONYMOUS=1)"
	CSM_ALLOW_ANONYMOUS=$${CSM_ALLOW_ANONYMOUS:-1} $(VENV)/bin/serve run serve_config.yaml

lint: $(STAMP)
	$(PY) -m ruff check $(LINTED)
	$(PY) -m ruff format --check $(LINTED)

test: $(STAMP) system-deps infra-deps lint
	$(PY) -m pytest -q
	$(MAKE) --no-print-directory frontend-test

bench: $(STAMP)
	$(PY) bench/engine.py
	$(PY) bench/codec.py --threads 1
	$(PY) bench/serve.py
