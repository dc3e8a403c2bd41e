# Fixtures for the _core tests: every test that takes `impl` runs once on the compiled twin (id
# `c`) and once on the pure-Python twin (id `py`), so the two cannot drift apart unnoticed.
# Never: skip the `c` run for any reason but a missing build (test_core_loaded.py fails loudly
# in that case, so a CI that forgot to compile cannot pass by skipping).
import importlib

import pytest

from smrd import _core_py

try:
    _core_c = importlib.import_module("smrd._core")
    _C_MISSING = None
except ImportError as exc:  # pragma: no cover - depends on the build
    _core_c = None
    _C_MISSING = f"smrd._core is not built ({exc}); build it with `pip install -e .`"


@pytest.fixture(
    params=[
        pytest.param("c", id="c"),
        pytest.param("py", id="py"),
    ]
)
def impl(request):
    """The _core module under test: the compiled twin (c) or the pure-Python twin (py)."""
    if request.param == "py":
        return _core_py
    if _core_c is None:
        pytest.skip(_C_MISSING)
    return _core_c


@pytest.fixture
def twins():
    """Both twins, for tests that compare them directly: (compiled, python)."""
    if _core_c is None:
        pytest.skip(_C_MISSING)
    return _core_c, _core_py


def _mutate(data, blob: bytes) -> bytes:
    """One random corruption of blob, drawn through hypothesis' `data` object: flip a bit,
    truncate, extend, splice random bytes in, or overwrite a little-endian field."""
    from hypothesis import strategies as st

    blob = bytearray(blob)
    kind = data.draw(st.sampled_from(["flip", "truncate", "extend", "splice", "field"]), label="kind")
    if kind == "flip" and blob:
        i = data.draw(st.integers(0, len(blob) - 1), label="byte")
        blob[i] ^= 1 << data.draw(st.integers(0, 7), label="bit")
    elif kind == "truncate":
        del blob[data.draw(st.integers(0, len(blob)), label="cut"):]
    elif kind == "extend":
        blob += data.draw(st.binary(min_size=1, max_size=64), label="tail")
    elif kind == "splice":
        start = data.draw(st.integers(0, len(blob)), label="start")
        stop = data.draw(st.integers(start, len(blob)), label="stop")
        blob[start:stop] = data.draw(st.binary(max_size=64), label="insert")
    elif kind == "field" and len(blob) >= 4:
        # Lengths and counts are where absurd values hurt most: write an extreme u32 somewhere.
        at = data.draw(st.integers(0, len(blob) - 4), label="at")
        value = data.draw(st.sampled_from([0, 1, 0x7FFFFFFF, 0xFFFFFFFF, len(blob), len(blob) + 1]))
        blob[at:at + 4] = value.to_bytes(4, "little")
    return bytes(blob)


@pytest.fixture
def mutate():
    """A function (data, blob) -> corrupted blob; see _mutate."""
    return _mutate
