"""The runtime's native host path: ``hostpath`` is the compiled ``_hostpath`` module (runtime/_hostpath.c),
or None where the install could not build it (no C compiler) or where ``EDGEGEN_PURE_PYTHON=1`` is set at
run time (the same variable that builds a pure wheel at install); the pure-Python steps then run, with the
same values. `edgegen doctor` says which."""
import os

PURE_PYTHON = os.environ.get("EDGEGEN_PURE_PYTHON", "") not in ("", "0")


def _load():
    if PURE_PYTHON:
        return None
    try:
        from . import _hostpath
    except ImportError:
        return None
    return _hostpath


hostpath = _load()
