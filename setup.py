"""The C parts of Parley; everything else is declared in pyproject.toml.

decoding/_native.c: the search's and the backend's per-step bookkeeping (a Python module).
server/engine/fused_ops.c: the int8 graphs' fused attention, norms and integer GEMM, an ONNX Runtime
custom-op library that sessions load (server.engine.session); built as an extension only so
that it lands next to the code that loads it. -O3 vectorizes its loops over positions and
dimensions.
"""

import numpy
from setuptools import Extension, setup

setup(ext_modules=[
    Extension("decoding._native", ["decoding/_native.c"], include_dirs=[numpy.get_include()],
              extra_compile_args=["-O2"]),
    Extension("server.engine._fused_ops", ["server/engine/fused_ops.c"],
              include_dirs=["third_party/onnxruntime/include"], libraries=["m"],
              extra_compile_args=["-O3"]),
])
