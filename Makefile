# devmodel: every target is idempotent; downloads and builds are cached under .cache/
# (or $DEVMODEL_CACHE) and redone only when their inputs change.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: all setup prereqs venv qemu image demo test bench clean

all: setup

# System tools a fresh Debian 12 lacks (python3-venv, gcc for the uAPI layout check,
# apt/dpkg are always there). Installed with apt only when missing; never needed twice.
prereqs:
	@missing=""; \
	$(PYTHON) -c 'import venv, ensurepip' 2>/dev/null || missing="$$missing python3-venv"; \
	command -v gcc >/dev/null 2>&1 || missing="$$missing gcc libc6-dev"; \
	command -v dpkg >/dev/null 2>&1 || missing="$$missing dpkg"; \
	if [ -n "$$missing" ]; then \
	  echo "installing system packages:$$missing"; \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq $$missing; \
	fi

$(STAMP): pyproject.toml | prereqs
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

venv: $(STAMP)

qemu: venv
	$(PY) -m devmodel qemu

image: venv
	$(PY) -m devmodel image

setup: venv qemu image

demo: setup
	$(PY) -m devmodel demo

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

bench: setup
	@mkdir -p bench-results
	@for b in benchmarks/bench_*.py; do \
	  echo "== $$b"; $(PY) $$b || exit 1; \
	done 2>&1 | tee bench-results/latest.txt

clean:
	rm -rf $(VENV) .cache bench-results .pytest_cache build *.egg-info
