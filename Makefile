# SalBench: `make run` (the main job) and `make test` (the default test suite) each do their
# own setup: a venv in .venv, the package with its dev extras, and the FMNIST data.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.salbench-installed
TORCH  := torch==2.14.1 torchvision==0.29.1
# offline CIFAR-10 copy (binary record files) used when present; see model_zoo/data.py
SHARED_CIFAR := $(abspath $(CURDIR)/../shared/data/cifar10)
export SALBENCH_CIFAR10_DIR ?= $(if $(wildcard $(SHARED_CIFAR)/test_batch.bin),$(SHARED_CIFAR),)
PYTEST := $(BIN)/python -m pytest

.PHONY: setup data browser run test test-slow bench clean help
help:
	@echo "make run        score the FMNIST (and CIFAR-10) zoo, write leaderboards/ and figures (main job)"
	@echo "make test       default test suite (< 15 min on 2 cores)"
	@echo "make test-slow  slow end-to-end tests (training, full scoring)"
	@echo "make bench      pytest-benchmark speed suite (ratios vs quantus/skimage/scipy)"

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $(STAMP)

setup: $(STAMP) data

# FMNIST: Debian's dataset-fashion-mnist when we are root with apt, else torchvision's download
data: $(STAMP)
	@$(BIN)/python -c "from salbench.model_zoo.data import load_split; load_split('fmnist', 'train', download=False); load_split('fmnist', 'test', download=False)" 2>/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist) >/dev/null || true; \
	  fi; \
	  $(BIN)/python -c "from salbench.model_zoo.data import load_split; s = load_split('fmnist', 'train'); t = load_split('fmnist', 'test'); print('FMNIST from', t.source)"; }

# FMNIST always; CIFAR-10 too where its files are (SALBENCH_CIFAR10_DIR). Committed results are re-used;
# models that need scoring are scored on one process per core, one thread each (salbench --procs, torch.distributed.run)
PROCS ?= $(shell nproc 2>/dev/null || echo 1)
run: setup
	$(BIN)/salbench --procs $(PROCS) --threads 1 run --dataset fmnist
	@if [ -n "$$SALBENCH_CIFAR10_DIR" ] && [ -f benchmark/imagesets/cifar10.json ]; then \
	  $(BIN)/salbench --procs $(PROCS) --threads 1 run --dataset cifar10; \
	else echo "CIFAR-10: skipped (set SALBENCH_CIFAR10_DIR to the folder with test_batch.bin)"; fi
	$(BIN)/salbench --threads 1 site

# Chromium for the site's browser test (tests/benchmark/test_site_browser.py): Debian's `chromium` when we are
# root with apt; elsewhere install Chromium/Chrome yourself or set SALBENCH_CHROMIUM (the test skips without one)
browser:
	@[ -n "$$SALBENCH_CHROMIUM" ] || [ -x /usr/lib/chromium/chromium ] || command -v chromium >/dev/null 2>&1 || \
	  command -v google-chrome >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing Debian's chromium for the site's browser test ..."; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null 2>&1 \
	      || echo "chromium could not be installed: the site's browser test will skip"; \
	  else echo "no Chromium and not root with apt: the site's browser test will skip (see SALBENCH_CHROMIUM)"; fi; }

test: setup browser
	$(PYTEST)

test-slow: setup
	$(PYTEST) -m slow

bench: setup
	$(PYTEST) benchmarks -o addopts="" -p no:cacheprovider --benchmark-only --benchmark-columns=mean,stddev,rounds -s

clean:
	rm -rf $(VENV) .pytest_cache .benchmarks
