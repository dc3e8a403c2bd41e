# Shared by the pytest-benchmark suites in bench/ (not part of the default test run: pyproject's
# testpaths is tests/). One switch lives here so that it reaches every benchmark alike:
#
#   BENCH_PLANT_SLOWDOWN=1   every benchmarked function does its work FACTOR times per call
#                            (BENCH_PLANT_FACTOR, default 3: +200%), a planted regression that
#                            the compare gate must catch (bench/check_regression_gate.py).
# Not SMRD_*: smrd refuses to start with an SMRD_ variable that is not one of its settings, and
# the e2e benchmark's cluster inherits this environment.
import os

import pytest
from pytest_benchmark.fixture import BenchmarkFixture

PLANTED = os.environ.get("BENCH_PLANT_SLOWDOWN", "").strip().lower() in ("1", "true", "yes")
FACTOR = int(os.environ.get("BENCH_PLANT_FACTOR", "3"))


def _repeated(fn):
    def slowed(*args, **kwargs):
        for _ in range(FACTOR - 1):
            fn(*args, **kwargs)
        return fn(*args, **kwargs)
    return slowed


class _PlantedSlowdown(BenchmarkFixture):
    """pytest-benchmark's fixture with the measured function wrapped by _repeated() (a subclass,
    because the plugin insists on a BenchmarkFixture instance)."""

    def __call__(self, function_to_benchmark, *args, **kwargs):
        return super().__call__(_repeated(function_to_benchmark), *args, **kwargs)

    def pedantic(self, target, *args, **kwargs):
        return super().pedantic(_repeated(target), *args, **kwargs)


@pytest.fixture
def benchmark(benchmark):  # noqa: F811 - wraps pytest-benchmark's own fixture of that name
    if PLANTED:
        benchmark.__class__ = _PlantedSlowdown
        benchmark.extra_info["planted_slowdown_factor"] = FACTOR
    return benchmark
