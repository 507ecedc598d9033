"""`edgegen doctor`: which backends really load here, and does each reproduce PyTorch's pixels."""
from __future__ import annotations

import platform

import numpy as np
import onnxruntime as ort

from .backends import ORT_PROVIDERS, backend_loads
from .check import pipeline_parity
from .jetson import describe, detect_jetson, jetson_notes, tensorrt_status

PIXEL_TOLERANCE = 1  # uint8 levels, fp32


def run_doctor(bundle=None, root="/") -> dict:
    """``root``: where to look for a Jetson's release files (tests point it at a fake board)."""
    from . import __version__
    import tokenizers
    versions = {"edgegen": __version__, "python": platform.python_version(), "machine": platform.machine(),
                "numpy": np.__version__, "onnxruntime": f"{ort.__version__} ({ort.get_device()})",
                "tokenizers": tokenizers.__version__}
    for extra in ("torch", "tensorrt", "tensorrt_rtx"):
        try:
            versions[extra] = __import__(extra).__version__
        except ImportError:
            versions[extra] = None
    notes = []
    if bundle is None:
        notes.append("no bundle and no export extra: backends were only probed, not compared with PyTorch "
                     "(pass --bundle or install edgegen[export])")
    jetson = detect_jetson(root)
    if jetson is not None:
        versions["jetson"] = describe(jetson)
        notes += jetson_notes(jetson, ort.__version__, ort.get_available_providers(), *tensorrt_status())
    backends = {}
    for name in ORT_PROVIDERS:
        loads, why = backend_loads(name)
        entry = {"ok": False, "loads": loads, "max_abs_pixel_diff": None, "error": why or None}
        if loads and bundle is not None:
            try:
                from .pipeline import Pipeline
                diff = pipeline_parity(Pipeline.from_bundle(bundle, backend=name, precision="fp32"))
                entry.update(max_abs_pixel_diff=diff, ok=diff <= PIXEL_TOLERANCE,
                             error=None if diff <= PIXEL_TOLERANCE else f"pixels differ by {diff:g} > {PIXEL_TOLERANCE}")
            except Exception as e:  # doctor reports every failure instead of stopping at the first
                entry["error"] = f"{type(e).__name__}: {e}"
        elif loads:
            entry["ok"] = True
        backends[name] = entry
    usable = [b for b in backends.values() if b["loads"]]
    return {"ok": bool(usable) and all(b["ok"] for b in usable), "versions": versions,
            "providers_listed": ort.get_available_providers(), "backends": backends, "notes": notes,
            "jetson": jetson}
