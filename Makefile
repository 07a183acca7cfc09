# raresignal — the two commands are `make demo` and `make test`; each sets itself up.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Debian packages the tests drive for real: promtool + Prometheus, Alertmanager, and
# PostgreSQL (the tests start a throwaway cluster with its initdb and pg_ctl).
APT_PACKAGES := prometheus prometheus-alertmanager postgresql
ARGS ?=
# Peers the curvature benchmark and its tests compare against. --no-deps: backpack asks
# for torchvision, whose PyPI build does not load beside the CPU torch pinned here.
BENCH_PEERS := pyhessian==0.1 backpack-for-pytorch==1.7.1 einops==0.8.2 unfoldNd==0.2.3
# Two workers by default: most tests wait on sockets or subprocesses, not the CPU.
PYTEST_ARGS ?= -n 2

.PHONY: help demo test venv tools lint format protos bench clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-8s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	$(PY) -m pip install --quiet --no-deps $(BENCH_PEERS)
	@touch $@

venv: $(STAMP) ## create .venv and install the pinned dependencies

tools: ## install the Debian tools the tests use (promtool, prometheus, alertmanager, postgresql)
	@missing=""; \
	command -v promtool >/dev/null || missing="$$missing prometheus"; \
	command -v prometheus >/dev/null || missing="$$missing prometheus"; \
	command -v prometheus-alertmanager >/dev/null || command -v alertmanager >/dev/null || missing="$$missing prometheus-alertmanager"; \
	command -v initdb >/dev/null || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="$$missing postgresql"; \
	if [ -n "$$missing" ]; then \
	  if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	    echo "installing$$missing from Debian"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(APT_PACKAGES) >/dev/null; \
	  else \
	    echo "note:$$missing not installed and apt-get unavailable: tests that need them will be skipped"; \
	  fi; \
	fi

demo: venv ## start a server, train with a rare slice, watch an alert fire, write a plot
	$(PY) -m raresignal.demo $(ARGS)

test: venv tools ## run the whole test suite
	$(PY) -m pytest $(PYTEST_ARGS)

lint: venv ## ruff
	$(VENV)/bin/ruff check .

format: venv
	$(VENV)/bin/ruff format .

protos: venv ## regenerate protos/v1 from protos/raresignal/v1/*.proto
	$(PY) protos/generate.py

bench: venv ## run the benchmarks (figures and commands in BENCHMARKS.md)
	$(PY) benchmarks/overhead.py
	$(PY) benchmarks/ingest.py
	$(PY) benchmarks/curvature.py --quick
	$(PY) benchmarks/detection.py --quick

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache raresignal-demo
