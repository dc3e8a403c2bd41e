# Proves which twin smrd.core selects. A CI that forgot to compile must fail here, not skip: the
# pure-Python twin is ~10x slower on the hot path, and every other core test would still pass.
import os
import subprocess
import sys
import types

import pytest

import smrd.core
from smrd._switch import no_extensions

_SWITCH_SET = no_extensions()


def _probe(env_value):
    """What a fresh interpreter reports for smrd.core, with SMRD_NO_EXTENSIONS set to env_value
    (None: unset). Returns (IMPLEMENTATION, module file of encode_frame's twin, stderr)."""
    env = {k: v for k, v in os.environ.items() if k != "SMRD_NO_EXTENSIONS"}
    if env_value is not None:
        env["SMRD_NO_EXTENSIONS"] = env_value
    code = ("import smrd.core, sys; "
            "print(smrd.core.IMPLEMENTATION); "
            "print(sys.modules[smrd.core.encode_frame.__module__ or 'smrd._core'].__file__)")
    proc = subprocess.run([sys.executable, "-W", "always", "-c", code], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    implementation, module_file = proc.stdout.split()
    return implementation, module_file, proc.stderr


def test_compiled_twin_is_loaded_without_the_switch():
    implementation, module_file, stderr = _probe(None)
    assert implementation == "cython", (
        "smrd.core fell back to the pure-Python twin: build the extension with `pip install -e .`\n"
        + stderr)
    assert module_file.endswith((".so", ".pyd")), module_file
    assert "RuntimeWarning" not in stderr


def test_compiled_twin_is_loaded_in_this_process():
    if _SWITCH_SET:
        # This run chose the twin on purpose; the check above still proves the build exists.
        assert smrd.core.IMPLEMENTATION == "python"
        assert smrd.core.encode_frame.__module__ == "smrd._core_py"
        return
    import smrd._core as compiled

    assert smrd.core.IMPLEMENTATION == "cython"
    assert smrd.core.encode_frame is compiled.encode_frame
    assert not isinstance(smrd.core.encode_frame, types.FunctionType)  # not Python bytecode
    assert compiled.__file__.endswith((".so", ".pyd"))
    assert smrd.core.Batch is compiled.Batch and smrd.core.ReplyCache is compiled.ReplyCache


@pytest.mark.parametrize("value", ["1", "true", "yes", "TRUE"])
def test_switch_selects_the_python_twin(value):
    implementation, module_file, stderr = _probe(value)
    assert implementation == "python"
    assert module_file.endswith("_core_py.py")
    assert "RuntimeWarning" not in stderr


def test_missing_build_falls_back_with_a_warning_naming_the_fix():
    env = {k: v for k, v in os.environ.items() if k != "SMRD_NO_EXTENSIONS"}
    code = ("import sys, warnings; sys.modules['smrd._core'] = None; "
            "warnings.simplefilter('always'); "
            "import smrd.core; print(smrd.core.IMPLEMENTATION)")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "python"
    assert "RuntimeWarning" in proc.stderr and "pip install -e ." in proc.stderr


def test_core_reexports_the_whole_api():
    from smrd import _core_py

    for name in _core_py.__all__:
        assert hasattr(smrd.core, name), name
    assert set(_core_py.__all__) <= set(smrd.core.__all__)
    assert smrd.core.ProtocolError is __import__("smrd.errors").errors.ProtocolError
