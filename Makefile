# xen-remus: every target installs what it needs (fresh Debian machine, root or sudo).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST := $(PY) -m pytest

.PHONY: all venv host-deps lint unit test bench demo cluster-demo soak soak-stock-hostkill clean lab-deps lab-images lab-test lab-test-all

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

# Real NBD clients for the disk tests (tests/unit/test_disk_clients.py); xmllint and the
# OCF resource agent DTD for the agent's meta-data (tests/unit/test_ocf_agent.py);
# Pacemaker's scheduler on a CIB file for the lab cluster (tests/unit/test_lab_cluster.py).
HOST_TOOLS := nbdinfo nbdcopy qemu-io fio xmllint crm_simulate
RA_DTD := /usr/share/resource-agents/ra-api-1.dtd
host-deps:
	@missing=; for t in $(HOST_TOOLS); do command -v $$t >/dev/null || missing=1; done; \
	test -e $(RA_DTD) || missing=1; \
	if [ -n "$$missing" ]; then apt-get update -q && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
	  libnbd-bin qemu-utils fio libxml2-utils resource-agents pacemaker-cli-utils; fi

lint: venv
	$(VENV)/bin/ruff check xen_remus lab tests bench
	$(VENV)/bin/mypy --strict xen_remus
	$(VENV)/bin/mypy --strict lab bench tests

unit: venv host-deps
	$(PYTEST) -q -m 'not lab' tests/unit tests/lab

test: venv host-deps
	@start=$$(date +%s); \
	$(MAKE) --no-print-directory lint && \
	$(PYTEST) -q -m 'not lab' tests/unit tests/lab && \
	$(MAKE) --no-print-directory lab-test; rc=$$?; \
	echo "make test: $$(( $$(date +%s) - start )) s"; exit $$rc

# The real-Xen lab (lab/README.md): host packages (apt-get, root), cached images, lab tests.
lab-deps: venv
	$(PY) -m lab deps

lab-images: lab-deps venv
	$(PY) -m lab build

# `make test` runs the lab tests listed in tests/lab/ci-tests.txt (those that have passed on
# real Xen here and fit CI's time); lab-test-all runs every lab test (long: an hour or more).
lab-test: lab-images
	$(PYTEST) -q -s -m lab --durations=0 $$(grep -v '^\s*\(#\|$$\)' tests/lab/ci-tests.txt)

lab-test-all: lab-images
	$(PYTEST) -q -s -m lab tests/lab

# Our protect (DEMO_PROTECT=xl: stock xl remus), kill host A, the guest goes on on B.
DEMO_PROTECT ?= xen-remus
demo: lab-images
	$(PY) -m lab demo --protect $(DEMO_PROTECT)

# Pacemaker drives xen-remus: a two-node cluster in the lab (dom0s with
# corosync and pacemaker: their own images, built on first use), kill host A, Pacemaker
# fences it and promotes B (lab/cluster.py, tests/lab/test_cluster.py).
cluster-demo: lab-deps venv
	$(PY) -m lab.cluster

# SOAK_N consecutive failovers into our receiver, each at a random cut of a stock xl remus
# stream (SOAK_RECEIVER=stock: stock xl migrate-receive -r behind the same cuts; it hangs
# now and then, LAB-NOTES 11). soak-stock-hostkill: the stock host-kill baseline, repeated.
SOAK_N ?= 20
SOAK_RECEIVER ?= ours
soak: lab-images
	XEN_REMUS_SOAK_RUNS=$(SOAK_N) XEN_REMUS_SOAK_RECEIVER=$(SOAK_RECEIVER) \
	  $(PYTEST) -q -s -m lab tests/lab/test_receive_soak.py

soak-stock-hostkill: lab-images
	@ok=0; for i in $$(seq $(SOAK_N)); do \
	  $(PYTEST) -q -s -m lab tests/lab/test_stock_baselines.py -k remus && ok=$$((ok+1)); \
	done; echo "soak: $$ok/$(SOAK_N) failovers passed"; [ $$ok = $(SOAK_N) ]

# Host sections, then the lab sections (one QEMU host): ours against stock xl, same run.
bench: lab-images
	$(PY) -m bench --lab

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
