"""The runtime's native host path: ``hostpath`` is the compiled ``_hostpath`` module (runtime/_hostpath.c),
or None where the install could not build it (no C compiler); the pure-Python steps then run, with the same
values. `edgegen doctor` says which."""
try:
    from . import _hostpath as hostpath
except ImportError:
    hostpath = None
