"""The optional native host path (runtime/_hostpath.c); everything else is declared in pyproject.toml.

It links numpy's libnpyrandom (shipped with numpy for extensions) for numpy's exact normal sampler. Where it
cannot be built (no C compiler or Python headers, no 128-bit integers), the install goes on and the runtime's
pure-Python host path runs instead (`edgegen doctor` says which). EDGEGEN_PURE_PYTHON=1 leaves it out: a
wheel that installs on every platform (docs/jetson.md).
"""

import os

import numpy
from setuptools import Extension, setup

numpy_dir = os.path.dirname(numpy.__file__)
native = os.environ.get("EDGEGEN_PURE_PYTHON", "") in ("", "0")
setup(
    ext_modules=[]
    if not native
    else [
        Extension(
            "edgegen.runtime._hostpath",
            ["runtime/_hostpath.c"],
            include_dirs=[numpy.get_include()],
            library_dirs=[
                os.path.join(numpy_dir, "random", "lib"),
                os.path.join(numpy_dir, "_core", "lib"),
                os.path.join(numpy_dir, "core", "lib"),
            ],  # numpy 2 / numpy 1 layouts of npymath
            libraries=["npyrandom", "npymath"],
            # no fused multiply-adds: pixels() must round exactly as numpy's float32 steps do
            extra_compile_args=["-O2", "-ffp-contract=off"] if os.name != "nt" else [],
            optional=True,
        )
    ]
)
