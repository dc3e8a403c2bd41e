# Builds the one compiled extension, smrd._core, from smrd/_core.pyx.
# SMRD_NO_EXTENSIONS=1 skips it: smrd then runs on the pure-Python twin (smrd/_core_py.py).
import importlib.util
import os

from setuptools import setup

# The switch is read in one place, smrd/_switch.py; loaded by path: nothing is built yet.
_spec = importlib.util.spec_from_file_location(
    "smrd_switch", os.path.join(os.path.dirname(os.path.abspath(__file__)), "smrd", "_switch.py"))
_switch = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_switch)

ext_modules = []
if not _switch.no_extensions():
    from Cython.Build import cythonize
    from setuptools import Extension

    ext_modules = cythonize(
        [Extension("smrd._core", ["smrd/_core.pyx"], extra_compile_args=["-O3"])],
        compiler_directives={
            "language_level": "3",
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
            "initializedcheck": False,
        },
    )

setup(ext_modules=ext_modules)
