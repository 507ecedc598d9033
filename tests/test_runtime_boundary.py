"""edgegen.runtime must import with torch, transformers and diffusers unavailable."""

import subprocess
import sys
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path

import edgegen.runtime

BLOCKER = r"""
import sys, importlib.abc, pkgutil, importlib
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "transformers", "diffusers", "edgegen_export_sentinel"):
            raise ImportError(f"blocked: {name}")
sys.meta_path.insert(0, Block())
import edgegen.runtime as rt
names = [m.name for m in pkgutil.walk_packages(rt.__path__, "edgegen.runtime.")]
for name in names:
    importlib.import_module(name)
leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "diffusers")
                or m.startswith("edgegen.export"))
print(len(names), leaked)
assert not leaked, leaked
"""


def test_runtime_imports_without_torch():
    result = subprocess.run([sys.executable, "-c", BLOCKER], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    count = int(result.stdout.split()[0])
    files = Path(
        edgegen.runtime.__file__
    ).parent.iterdir()  # its .py files and its compiled module (the host path)
    expected = len(
        {f.name.split(".")[0] for f in files if f.name.endswith((".py", *EXTENSION_SUFFIXES))} - {"__init__"}
    )
    assert count == expected, f"imported {count} runtime modules, {expected} exist"
