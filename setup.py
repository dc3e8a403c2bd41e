# Builds the one compiled extension, smrd._core, from smrd/_core.pyx.
# SMRD_NO_EXTENSIONS=1 skips it: smrd then runs on the pure-Python twin (smrd/_core_py.py).
import os

from setuptools import setup

ext_modules = []
if os.environ.get("SMRD_NO_EXTENSIONS", "").strip().lower() not in ("1", "true", "yes"):
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
