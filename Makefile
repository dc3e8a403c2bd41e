# The README's commands. `make run` sets up and starts a local replicated cluster; `make test`
# sets up and runs the tests (what .ci/run calls).
PY ?= python3
PIP_FLAGS ?= --quiet --disable-pip-version-check --root-user-action=ignore
SEEDS ?= 100000

.PHONY: install run test test-fast bench soak clean

install:  ## install smrd (compiling the smrd._core extension) and the test tools
	$(PY) -m pip install $(PIP_FLAGS) -e '.[test]'

run: install  ## a local cluster: 3 replicas beside 3 hashmap apps, 1 gateway on 127.0.0.1:11900
	$(PY) -m smrd local

test: install  ## every test (unit, simulation, real processes)
	$(PY) -m pytest -q

test-fast: install  ## unit tests only
	$(PY) -m pytest -q tests/unit

bench: install  ## microbenchmarks of the hot path, both twins side by side
	$(PY) -m pytest bench --benchmark-only --benchmark-group-by=group -q

soak: install  ## long simulation soak: make soak SEEDS=100000
	$(PY) -m smrd.simulation --seeds $(SEEDS)

clean:
	rm -rf build dist *.egg-info smrd/_core.c smrd/*.so smrd/_core.html .pytest_cache .benchmarks
