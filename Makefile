# Quick start: `make demo` runs the embedded default, `make test` runs the suite.
# Both create .venv on first use and install the tested versions from constraints.txt;
# later runs skip the install unless pyproject.toml or constraints.txt changed. The install
# runs through uv (pinned below; about five times faster than pip here, the same versions),
# given the wheel folders pip is configured with (this machine's local CPU torch wheel), and
# does not byte-compile; the targets run with PYTHONDONTWRITEBYTECODE unset (this
# project's containers set it): each module is compiled once, by the first process that
# imports it, and only the modules something imports (compiling all of site-packages up front
# took 35 s here; without .pyc files every test process and Ray worker would recompile torch).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
PYTEST_ARGS ?=
UV_VERSION := 0.13.9
# pip's own --find-links (environment or pip config), handed to uv, which reads neither
FIND_LINKS = $(or $(PIP_FIND_LINKS),$(shell $(PYTHON) -m pip config get global.find-links 2>/dev/null))
BENCH_ARGS ?= --images 2000 --pipeline-images 10000 --scale-out 1 2 4

export RAY_USAGE_STATS_ENABLED := 0
unexport PYTHONDONTWRITEBYTECODE
# Files tests keep for people to look at (the report screenshot): git-ignored.
export SCALECERT_TEST_ARTIFACTS ?= $(CURDIR)/test-artifacts

.PHONY: install test demo bench reproduce-cifar reproduce-imagenet clean

install: $(INSTALLED)

$(INSTALLED): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --no-compile "uv==$(UV_VERSION)"
	$(VENV)/bin/uv pip install -q --python $(PY) $(addprefix --find-links ,$(FIND_LINKS)) \
		-c constraints.txt -e ".[test]"
	@touch $@

test: $(INSTALLED)
	$(PY) -m pytest $(PYTEST_ARGS)

demo: $(INSTALLED)
	$(VENV)/bin/scalecert demo

bench: $(INSTALLED)
	$(PY) bench/harness.py $(BENCH_ARGS)
	$(PY) bench/scaling_model.py

# Fine-tune and certify CIFAR-10 as in docs/REPRODUCTION.md (hours on a CPU; resumable).
reproduce-cifar: $(INSTALLED)
	bash bench/reproduce_cifar.sh

# Certify EfficientNet-Lite0 on the 220 ImageNet photos of ../shared as in docs/REPRODUCTION.md
# (about 40 minutes on 2 quiet cores; resumable).
reproduce-imagenet: $(INSTALLED)
	bash bench/reproduce_imagenet.sh

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
