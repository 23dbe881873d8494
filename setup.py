"""The C part of Parley (decoding/_native.c); everything else is declared in pyproject.toml."""

import numpy
from setuptools import Extension, setup

setup(ext_modules=[Extension("decoding._native", ["decoding/_native.c"], include_dirs=[numpy.get_include()],
                             extra_compile_args=["-O2"])])
