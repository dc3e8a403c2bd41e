# The README's commands. `make run` sets up and starts a local replicated cluster; `make test`
# sets up and runs the tests (what .ci/run calls).
PY ?= python3
PIP_FLAGS ?= --quiet --disable-pip-version-check --root-user-action=ignore
SEEDS ?= 100000

.PHONY: install install-test run test test-fast bench bench-check experiments soak clean

CHECKOV_VENV ?= .venv-checkov

install:  ## install smrd, compiling the smrd._core extension and its bytecode
	$(PY) -m pip install $(PIP_FLAGS) -e .
	@# An editable install leaves bytecode to the first import, and with PYTHONDONTWRITEBYTECODE
	@# set every process start compiles smrd's modules again (~0.1 s of CPU each); pip compiles
	@# a wheel's at install time, which this does for the checkout.
	$(PY) -m compileall -q smrd

install-test:  ## install smrd and everything the tests need
	bash scripts/install-system-tools.sh
	$(PY) -m pip install $(PIP_FLAGS) -e '.[test]'
	$(PY) -m compileall -q smrd
	@# checkov pins an older `packaging`: it lives in its own venv, used by the chart tests.
	@test -x $(CHECKOV_VENV)/bin/checkov || { $(PY) -m venv $(CHECKOV_VENV) && \
		$(CHECKOV_VENV)/bin/pip install $(PIP_FLAGS) checkov==3.3.30; }

run: install  ## a local cluster: 3 replicas beside 3 hashmap apps, 1 gateway on 127.0.0.1:11900
	$(PY) -m smrd local

test: install-test  ## every test (unit, simulation, real processes, chart)
	CHECKOV=$(CURDIR)/$(CHECKOV_VENV)/bin/checkov $(PY) -m pytest -q

test-fast: install-test  ## unit tests only
	$(PY) -m pytest -q tests/unit

bench: install-test  ## regression gate: _core microbenchmarks + e2e run vs bench/baseline
	$(PY) -m pytest bench --benchmark-only --benchmark-group-by=group -q \
		--benchmark-storage=bench/baseline --benchmark-compare --benchmark-compare-fail=min:100%

bench-check: install-test  ## the gate passes as is and fails on a planted slowdown
	$(PY) bench/check_regression_gate.py

experiments: install-test  ## the paper's experiments with same-run baselines (~4 min): results/quick/
	$(PY) -m pip install $(PIP_FLAGS) matplotlib
	$(PY) -m bench.experiments --profile quick --out results/quick

soak: install  ## long simulation soak: make soak SEEDS=100000
	$(PY) -m smrd.simulation --seeds $(SEEDS)

clean:
	rm -rf build dist *.egg-info smrd/_core.c smrd/*.so smrd/_core.html .pytest_cache .benchmarks
