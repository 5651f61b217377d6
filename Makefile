# The two commands of the README's Quickstart: `make up` and `make test`.
# Each does all of its own set-up on a fresh Debian 12 machine with Python 3.11.

PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: up test check system-deps native protos clean

up: native
	$(BIN)/snapbright up

# The tests run the compiled hot path, as a deployment does (tests/proxy/test_native.py).
test: system-deps $(STAMP)
	$(BIN)/python scripts/native.py --require
	SNAPBRIGHT_REQUIRE_NATIVE=1 $(MAKE) --no-print-directory check

# Everything the tests run, in the order a reviewer reads it.
check:
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports
	$(BIN)/python scripts/protos.py --check
	$(BIN)/pytest

system-deps:
	PYTHON=$(PYTHON) bash scripts/system-deps.sh

# Compile the hot path with mypyc when a source changed (proxy/native.py says which modules).
native: $(STAMP)
	$(BIN)/python scripts/native.py

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade 'pip>=25.1'
	$(BIN)/python -m pip install --quiet -e . --group dev
	touch $(STAMP)

protos: $(STAMP)
	$(BIN)/python scripts/protos.py

clean:
	test ! -x $(BIN)/python || $(BIN)/python scripts/native.py --clean
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache build
