"""Which twin of smrd._core runs: SMRD_NO_EXTENSIONS=1 (or true, yes) selects the pure-Python one
(smrd/_core_py.py) and makes setup.py skip building the compiled one.

Owns: reading that switch, for setup.py (load this file by path), smrd.core and the tests.
Never: imports anything of smrd: setup.py runs it before anything is built.
"""
import os


def no_extensions(environ=None) -> bool:
    value = (os.environ if environ is None else environ).get("SMRD_NO_EXTENSIONS", "")
    return value.strip().lower() in ("1", "true", "yes")
