# aiplatform — the two commands: `make run` (quickstart) and `make test` (the whole suite).
# Both create .venv and install everything they need; nothing else has to be set up first.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# The locks (requirements/, made by `make lock`): every package pinned, every file's sha256 checked.
LOCKS  := requirements/dev.lock requirements/torch-cpu.lock requirements/runtime.lock
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml $(LOCKS) | cksum | cut -d' ' -f1)
PYTEST := $(BIN)/python -m pytest -p no:cacheprovider --durations=15

.PHONY: setup lock audit redis-server prometheus azurite chromium run test test-unit test-integration test-e2e bench clean

setup: $(STAMP) redis-server prometheus azurite chromium

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

# The pages' browser tests drive Debian's headless Chromium with Selenium (tests/integration/test_pages_browser.py).
chromium:
	@{ command -v chromium && command -v chromedriver; } >/dev/null 2>&1 || { \
	  echo "installing chromium and chromium-driver (Debian packages) for the pages' browser tests"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends \
	    chromium chromium-driver >/dev/null; }

# The Azure storage tests start Azurite (Microsoft's Azure Storage emulator, from npm) on loopback.
AZURITE := .cache/azurite/node_modules/.bin/azurite-blob
azurite:
	@test -x $(AZURITE) || { \
	  if command -v npm >/dev/null 2>&1; then \
	    echo "installing Azurite (npm) into .cache/azurite for the Azure storage tests"; \
	    npm install --silent --no-save --no-audit --no-fund --prefix .cache/azurite azurite@3 >/dev/null \
	      || echo "warning: npm could not install Azurite: the Azure storage tests will say why they skip"; \
	  else echo "npm not found: the Azure storage tests will be skipped (install Node.js 18+)"; fi; }

# Installs exactly the lock (hash-checked: pip refuses a file whose sha256 differs), then the
# package itself without resolving anything. No GPU: torch's CPU build from its own lock (a plain
# `torch` pulls a multi-GB CUDA build); with one, PyPI's CUDA build of the same version, unlocked.
$(STAMP): pyproject.toml $(LOCKS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	if ! $(BIN)/python -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then \
	  echo "note: the locks in requirements/ are for CPython 3.11; installing pyproject.toml's ranges instead" \
	       "(not reproducible: make PYTHON=python3.11 for the locked set)"; \
	  $(BIN)/python -m pip install -q "$$(grep -o '^torch==[0-9.]*' requirements/torch-cpu.lock)" \
	  && $(BIN)/python -m pip install -q -e ".[test,bench]"; \
	elif command -v nvidia-smi >/dev/null 2>&1; then \
	  $(BIN)/python -m pip install -q --require-hashes -r requirements/dev.lock \
	  && $(BIN)/python -m pip install -q "$$(grep -o '^torch==[0-9.]*' requirements/torch-cpu.lock)" \
	  && $(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .; \
	else $(BIN)/python -m pip install -q --require-hashes -r requirements/dev.lock -r requirements/torch-cpu.lock \
	  && $(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .; fi
	$(BIN)/python -m pip check
	rm -f $(VENV)/.installed-*
	touch $@

# Re-resolve the locks from pyproject.toml (run it after any change to its dependencies:
# tests/unit/test_supply_chain.py fails while they disagree). Resolved for CPython 3.11 on
# x86_64 Linux (CI, the Docker image's py311) from PyPI, plus torch's CPU wheel from pip's
# find-links folder, or PyTorch's CPU index where pip has none.
UV         := $(BIN)/uv
UV_VERSION := 0.13.9
TORCH_CPU  := $(shell sed -n 's/^torch==//p' requirements/torch-cpu.in)
TORCH_WHEELS ?= $(or $(shell $(BIN)/python -m pip config get global.find-links 2>/dev/null),https://download.pytorch.org/whl/cpu/torch/)
UV_COMPILE = $(UV) pip compile --quiet --generate-hashes --python-version 3.11 \
	--python-platform x86_64-manylinux_2_28 --index-strategy unsafe-best-match \
	--find-links $(TORCH_WHEELS) --constraint requirements/torch-cpu.in --custom-compile-command "make lock"
lock:
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q "uv==$(UV_VERSION)"
	$(UV_COMPILE) --no-emit-package torch --extra test --extra bench \
	  pyproject.toml requirements/build.in -o requirements/dev.lock
	$(UV_COMPILE) --no-emit-package torch pyproject.toml requirements/build.in -o requirements/runtime.lock
	# uv records no hash for a wheel from a local folder: pip hashes the CPU wheel itself.
	rm -rf .cache/torch-cpu && $(BIN)/python -m pip download -q --no-deps --dest .cache/torch-cpu \
	  --find-links $(TORCH_WHEELS) "torch==$(TORCH_CPU)"
	{ echo "# torch's CPU build, for \`make setup\` on a machine without a GPU; made by \`make lock\`."; \
	  echo "torch==$(TORCH_CPU) \\"; \
	  $(BIN)/python -m pip hash .cache/torch-cpu/torch-*.whl | sed -n 's/^--hash=/    --hash=/p'; } \
	  > requirements/torch-cpu.lock
	rm -rf .cache/torch-cpu

# pip-audit over the locks (.ci/audit.py): fails on a known vulnerability that the README does
# not justify; where no vulnerability service answers, it says so and does not fail.
audit: setup
	$(BIN)/python .ci/audit.py requirements/dev.lock requirements/torch-cpu.lock

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
