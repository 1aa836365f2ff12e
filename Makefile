# jvdm — every target sets itself up from a fresh clone.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# The environment is rebuilt whenever pyproject.toml changes.
STAMP  := $(VENV)/.stamp-$(shell sha256sum pyproject.toml setup.cfg | sha256sum | cut -c1-16)
EXP    ?= learned_snr
WORKDIR ?= runs/$(EXP)
ARGS   ?=
PYTEST_ARGS ?=
# Test workers (pytest-xdist): compilation is single-threaded, so two workers keep both cores busy.
# Each test file stays on one worker (its module fixtures are computed once), and the files go out
# in collection order, which tests/conftest.py sorts longest first.
TEST_WORKERS ?= 2
XDIST := -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

.PHONY: install test test-slow test-all lint format train sample eval bench clean

install: $(STAMP)

$(STAMP): pyproject.toml setup.cfg
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@rm -f $(VENV)/.stamp-*
	@touch $@

# The default tier (under 8 minutes on 2 cores); the slow tier holds the second routes that take
# long (several processes, 1 against 4 devices, every dataset shape, trainers in subprocesses).
# CI (.ci/run) runs both.
test: $(STAMP)
	$(PY) -m pytest -m "not slow" $(XDIST) $(PYTEST_ARGS)

test-slow: $(STAMP)
	$(PY) -m pytest -m slow $(XDIST) $(PYTEST_ARGS)

test-all: $(STAMP)
	$(PY) -m pytest $(XDIST) $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests experiments bench
	$(VENV)/bin/ruff format --check src tests experiments bench

format: $(STAMP)
	$(VENV)/bin/ruff format src tests experiments bench
	$(VENV)/bin/ruff check --fix src tests experiments bench

train: $(STAMP)
	$(VENV)/bin/jvdm train --config experiments/$(EXP).py --workdir $(WORKDIR) $(ARGS)

sample: $(STAMP)
	$(VENV)/bin/jvdm sample --workdir $(WORKDIR) --n 64 --out $(WORKDIR)/samples.png $(ARGS)

eval: $(STAMP)
	$(VENV)/bin/jvdm eval --workdir $(WORKDIR) $(ARGS)

bench: $(STAMP)
	$(PY) bench/run_all.py $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache src/*.egg-info
