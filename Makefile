# aiplatform — the two commands: `make run` (quickstart) and `make test` (the whole suite).
# Both create .venv and install everything they need; nothing else has to be set up first.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)
PYTEST := $(BIN)/python -m pytest -p no:cacheprovider --durations=15

.PHONY: setup redis-server prometheus azurite run test test-unit test-integration test-e2e bench clean

setup: $(STAMP) redis-server prometheus azurite

# The Redis online store's tests start a real redis-server on loopback (Debian's package).
redis-server:
	@command -v redis-server >/dev/null 2>&1 || { \
	  echo "installing redis-server (Debian package) for the Redis online-store tests"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq redis-server >/dev/null; }

# The metrics test scrapes the app with a real Prometheus on loopback (Debian's package, with promtool).
prometheus:
	@command -v prometheus >/dev/null 2>&1 || { \
	  echo "installing prometheus (Debian package) for the metrics tests"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null; }

# The Azure storage tests start Azurite (Microsoft's Azure Storage emulator, from npm) on loopback.
AZURITE := .cache/azurite/node_modules/.bin/azurite-blob
azurite:
	@test -x $(AZURITE) || { \
	  if command -v npm >/dev/null 2>&1; then \
	    echo "installing Azurite (npm) into .cache/azurite for the Azure storage tests"; \
	    npm install --silent --no-save --no-audit --no-fund --prefix .cache/azurite azurite@3 >/dev/null \
	      || echo "warning: npm could not install Azurite: the Azure storage tests will say why they skip"; \
	  else echo "npm not found: the Azure storage tests will be skipped (install Node.js 18+)"; fi; }

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# No GPU: take the CPU build of torch (a plain `torch` pulls a multi-GB CUDA build).
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(BIN)/python -m pip install -q "torch==2.13.0"; fi
	$(BIN)/python -m pip install -q -e ".[test,bench]"
	rm -f $(VENV)/.installed-*
	touch $@

run: setup
	$(BIN)/aiplatform quickstart

test: setup
	$(PYTEST) tests/unit -q
	$(PYTEST) tests/integration -q
	$(PYTEST) tests/e2e -q

test-unit: setup
	$(PYTEST) tests/unit -q

test-integration: setup
	$(PYTEST) tests/integration -q

test-e2e: setup
	$(PYTEST) tests/e2e -q

bench: setup
	$(BIN)/python benchmarks/run.py

clean:
	rm -rf .aiplatform benchmarks/results
