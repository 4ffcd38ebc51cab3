# Every target installs what it needs on first use: `make run` and `make test` are the only
# set-up a fresh machine needs.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: install run test lint typecheck fmt pytest bench chaos clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/sitewire run

lint: $(STAMP)
	$(BIN)/ruff check app workers tests bench
	$(BIN)/ruff format --check app workers tests bench

typecheck: $(STAMP)
	$(BIN)/mypy

pytest: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test: lint typecheck pytest

fmt: $(STAMP)
	$(BIN)/ruff check --fix app workers tests bench
	$(BIN)/ruff format app workers tests bench

bench: $(STAMP)
	$(BIN)/python -m bench.run

chaos: $(STAMP)
	SITEWIRE_CHAOS=full $(BIN)/python -m pytest tests/chaos -v -s $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .sitewire .pytest_cache .mypy_cache .ruff_cache bench/.build
