"""Builds the project's one C extension, tools/_rgbsums.c; all else is in pyproject.toml.

The extension is optional: where it cannot be compiled, `pip install` goes on and
tools/compute_pca.py uses its (slower, equally exact) NumPy path and says so.
"""
import sys

from setuptools import Extension, setup

setup(ext_modules=[Extension(
    "tools._rgbsums", ["tools/_rgbsums.c"], optional=True,
    # -O3: GCC vectorizes the sums loop only from -O3 up (at -O2 it ran 3-8x slower)
    extra_compile_args=[] if sys.platform == "win32" else ["-O3"],
)])
