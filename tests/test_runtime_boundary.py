"""edgegen.runtime must import with torch, transformers and diffusers unavailable."""
import subprocess
import sys
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
    expected = len(list(Path(edgegen.runtime.__file__).parent.glob("*.py"))) - 1  # minus __init__
    assert count == expected, f"imported {count} runtime modules, {expected} exist"
