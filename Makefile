# Every target installs what it needs on first use: `make run` and `make test` are the only
# set-up a fresh machine needs.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
PIP    := $(BIN)/python -m pip --disable-pip-version-check
# Exact versions (with hashes) of everything `make` installs: the runtime dependencies and the
# dev and local extras, resolved for Linux x86_64 and CPython 3.11 (this machine, CI, the image).
LOCK   := requirements.lock
# `make lock` keeps the pins that still fit pyproject.toml; `make lock LOCK_ARGS=--upgrade`
# moves every pin to the newest release, `LOCK_ARGS='--upgrade-package uvicorn'` one of them.
LOCK_ARGS ?=
PIP_TOOLS := pip-tools==7.6.2

.PHONY: install lock run test lint typecheck fmt pytest bench bench-scale chaos clean

# The lock first, with hashes, then the project itself without resolving anything again. The
# first install takes a minute or two: say so, and show pip's progress on one line
# (tools/install.py), since silence that long looks like a hang.
$(STAMP): pyproject.toml $(LOCK)
	@if test -x $(BIN)/python; then \
	  echo "updating $(VENV): pyproject.toml or $(LOCK) changed..."; \
	else \
	  echo "installing Sitewire's dependencies into $(VENV) (first run only, about a minute or two)..."; \
	  $(PYTHON) -m venv $(VENV); \
	fi
	@$(BIN)/python tools/install.py --disable-pip-version-check install --require-hashes -r $(LOCK)
	@$(PIP) install --quiet --no-deps -e .
	@touch $(STAMP)

install: $(STAMP)

# Regenerate the lock from pyproject.toml (runtime + dev + local); commit it with the change.
lock:
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet '$(PIP_TOOLS)'
	CUSTOM_COMPILE_COMMAND='make lock' $(BIN)/pip-compile --quiet $(LOCK_ARGS) \
	  --generate-hashes --allow-unsafe --strip-extras --no-emit-index-url --no-emit-find-links \
	  --extra dev --extra local --output-file $(LOCK) pyproject.toml
	sed -i '1i # Resolved for Linux x86_64 and CPython 3.11 (environment markers were evaluated there).' $(LOCK)

run: $(STAMP)
	$(BIN)/sitewire run

lint: $(STAMP)
	$(BIN)/ruff check app workers tests bench tools
	$(BIN)/ruff format --check app workers tests bench tools

typecheck: $(STAMP)
	$(BIN)/mypy

pytest: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test: lint typecheck pytest

fmt: $(STAMP)
	$(BIN)/ruff check --fix app workers tests bench tools
	$(BIN)/ruff format app workers tests bench tools

bench: $(STAMP)
	$(BIN)/python -m bench.run

# Scenario 6 alone (bench/scale.py): 100,000 viewers on two gateway replicas, a rolling restart,
# 10,000 sites. Minutes, and most of the machine; `python -m bench.run --scale` adds it to the
# full suite.
bench-scale: $(STAMP)
	$(BIN)/python -m bench.run --only 6 --out bench/results/scale.md

chaos: $(STAMP)
	SITEWIRE_CHAOS=full $(BIN)/python -m pytest tests/chaos -v -s $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .sitewire .pytest_cache .mypy_cache .ruff_cache bench/.build
