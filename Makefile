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

.PHONY: setup data browser run test test-slow bench clean help setup-tda tda test-tda readme-tables
help:
	@echo "make run        score the FMNIST (and CIFAR-10) zoo, write leaderboards/ and figures (main job)"
	@echo "make test       default test suite (< 15 min on 2 cores)"
	@echo "make test-slow  slow end-to-end tests (training, full scoring)"
	@echo "make bench      pytest-benchmark speed suite (ratios vs quantus/skimage/scipy)"
	@echo "make readme-tables  copy the generated tables the README quotes (after salbench leaderboard)"
	@echo "make setup-tda  optional training-data attribution extra (quanda) in .venv-tda"
	@echo "make tda        the TDA track: leaderboards/fmnist_tda.csv + figure (after setup-tda)"
	@echo "make test-tda   the TDA track's tests, in .venv-tda"

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

# after `salbench leaderboard`: copy the generated tables the README quotes (a test keeps them equal)
readme-tables: setup
	$(BIN)/python -c "from pathlib import Path; from salbench.benchmark.leaderboard import sync_readme_quotes; print('README tables updated:', sync_readme_quotes(Path('README.md')) or 'none')"
	$(BIN)/python -m salbench.benchmark.metric_cards

test: setup browser
	$(PYTEST)

test-slow: setup
	$(PYTEST) -m slow

bench: setup
	$(PYTEST) benchmarks -o addopts="" -p no:cacheprovider --benchmark-only --benchmark-columns=mean,stddev,rounds -s

# Optional training-data attribution track (quanda; docs/tda.md). quanda 0.5.0 pins captum<0.9, the core uses
# captum 0.9, so the extra 'tda' of pyproject.toml goes into its own venv. A .pth file there adds .venv's
# site-packages *after* its own: torch and the editable salbench come from .venv (not installed twice),
# while .venv-tda's captum 0.8 (and numpy 1.26 that captum 0.8 pins) win inside .venv-tda only.
TDA_VENV  := .venv-tda
TDA_BIN   := $(TDA_VENV)/bin
TDA_STAMP := $(TDA_VENV)/.salbench-tda-installed
$(TDA_STAMP): $(STAMP) pyproject.toml
	@test -x $(TDA_BIN)/python || $(BIN)/python -m venv $(TDA_VENV)
	@$(BIN)/python -c "import sysconfig; print('import site; site.addsitedir(%r)' % sysconfig.get_paths()['purelib'])" \
	  > "$$($(TDA_BIN)/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/salbench-core-venv.pth"
	@$(BIN)/python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['tda']))" \
	  > $(TDA_VENV)/tda-requirements.txt
	$(TDA_BIN)/python -m pip install -q -r $(TDA_VENV)/tda-requirements.txt
	@printf '#!/bin/sh\nexec "$$(dirname "$$0")/python" -m salbench.benchmark.cli "$$@"\n' > $(TDA_BIN)/salbench
	@chmod +x $(TDA_BIN)/salbench
	@$(TDA_BIN)/python -c "import captum, quanda, torch, salbench.benchmark.tda; print('tda extra: quanda ok, captum', captum.__version__, '(.venv-tda), torch', torch.__version__, '(.venv)')"
	@touch $(TDA_STAMP)

setup-tda: setup $(TDA_STAMP)

tda: setup-tda
	$(TDA_BIN)/salbench --threads 1 tda --dataset fmnist

# skipped (pytest reports why) only when quanda cannot be fetched from the package index; any other install error fails
test-tda: setup
	@if $(MAKE) --no-print-directory setup-tda; then \
	  $(TDA_BIN)/python -m pytest tests_tda -p no:cacheprovider; \
	elif $(BIN)/python -m pip download -q --no-deps --no-cache-dir -d $(TDA_VENV)-probe quanda==0.5.0 >/dev/null 2>&1; then \
	  rm -rf $(TDA_VENV)-probe; echo "make test-tda: installing the 'tda' extra failed although quanda is on the index (see above)"; exit 1; \
	else \
	  SALBENCH_TDA_SKIP="the 'tda' extra could not be installed: quanda==0.5.0 is not downloadable from the package index" \
	    $(PYTEST) tests_tda -p no:cacheprovider; \
	fi

clean:
	rm -rf $(VENV) $(TDA_VENV) .pytest_cache .benchmarks
