# xen-remus: every target installs what it needs (fresh Debian machine, root or sudo).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST := $(PY) -m pytest

.PHONY: all venv lint unit test bench demo soak clean

all: test

# Host Python environment for the unit tests and the lab driver.
$(VENV)/.done: setup.py pyproject.toml
	@command -v python3 >/dev/null || { apt-get update -q && apt-get install -y -q python3; }
	@python3 -c 'import venv, ensurepip' 2>/dev/null || { apt-get update -q && apt-get install -y -q python3-venv; }
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

venv: $(VENV)/.done

lint: venv
	$(VENV)/bin/ruff check xen_remus lab tests
	$(VENV)/bin/mypy --strict xen_remus

unit: venv
	$(PYTEST) -q -m 'not lab' xen_remus/tests tests

test: venv
	@start=$$(date +%s); \
	$(MAKE) --no-print-directory lint && \
	$(PYTEST) -q -m 'not lab' xen_remus/tests tests; rc=$$?; \
	echo "make test: $$(( $$(date +%s) - start )) s"; exit $$rc

bench: venv
	$(PY) -m xen_remus.bench

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
