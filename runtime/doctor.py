"""`edgegen doctor`: which backends really load here, and does each reproduce PyTorch's pixels.

"Loads" is what a session or module really gets, not what is listed: onnxruntime-gpu lists the CUDA and
TensorRT providers even where their libraries are missing, so each is probed by creating a session and
reading back its providers; TensorRT flavours are imported; the GPU is asked for through libcudart.
"""

from __future__ import annotations

import platform

import numpy as np
import onnxruntime as ort

from . import native
from .backends import BACKEND_SPECS, backend_loads, backend_spec
from .check import pipeline_parity
from .cudart import gpu_status
from .errors import BackendUnavailableError, EngineMismatchError
from .jetson import describe, detect_jetson, jetson_notes, tensorrt_status


def run_doctor(bundle=None, root="/") -> dict:
    """``root``: where to look for a Jetson's release files (tests point it at a fake board)."""
    import tokenizers

    from . import __version__

    versions = {
        "edgegen": __version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "numpy": np.__version__,
        "onnxruntime": f"{ort.__version__} ({ort.get_device()})",
        "tokenizers": tokenizers.__version__,
        "host_path": "native"
        if native.hostpath is not None
        else "pure Python (EDGEGEN_PURE_PYTHON is set)"
        if native.PURE_PYTHON
        else "pure Python (the native module was not built: no C compiler at install?)",
    }
    try:
        versions["torch"] = __import__("torch").__version__
    except ImportError:
        versions["torch"] = None
    notes = []
    if bundle is None:
        notes.append(
            "no bundle and no export extra: backends were only probed, not compared with PyTorch "
            "(pass --bundle or install edgegen[export])"
        )
    jetson = detect_jetson(root)
    if jetson is not None:
        versions["jetson"] = describe(jetson)
        notes += jetson_notes(jetson, ort.__version__, ort.get_available_providers(), *tensorrt_status())
    gpu = gpu_status()
    tensorrt = tensorrt_flavours()
    for flavour, entry in tensorrt.items():  # under the module's usual name, whichever of its names imported
        versions[BACKEND_SPECS[flavour].engines.modules[0]] = entry["version"]
    backends = {}
    for name in BACKEND_SPECS:
        loads, why = backend_loads(name)
        entry = {
            "ok": False,
            "loads": loads,
            "max_abs_pixel_diff": None,
            "error": why or None,
            "checked": False,
        }
        skip = _no_engines(bundle, name) if loads and bundle is not None else None
        if skip:  # the runtime loads, this bundle has no fp32 engines for it: not a fault of this machine
            entry.update(ok=True, error=f"not compared: {skip}")
        elif loads and bundle is not None:
            try:
                from .pipeline import Pipeline

                pipe = Pipeline.from_bundle(bundle, backend=name, precision="fp32")
                diff = pipeline_parity(pipe)
                limit = backend_spec(name).pixel_tolerance
                entry.update(
                    max_abs_pixel_diff=diff,
                    ok=diff <= limit,
                    checked=True,
                    cuda_graphs=any(getattr(g, "cuda_graphs", False) for g in pipe._graphs.values()),
                    error=None if diff <= limit else f"pixels differ by {diff:g} > {limit}",
                )
            except Exception as e:  # doctor reports every failure instead of stopping at the first
                entry.update(error=f"{type(e).__name__}: {e}", checked=True)
        elif loads:
            entry["ok"] = True
        backends[name] = entry
    usable = [b for b in backends.values() if b["loads"]]
    return {
        "ok": bool(usable) and all(b["ok"] for b in usable),
        "versions": versions,
        "providers_listed": ort.get_available_providers(),
        "providers_loaded": {
            spec.provider: backends[name]["loads"] for name, spec in BACKEND_SPECS.items() if spec.provider
        },
        "gpu": gpu,
        "tensorrt": tensorrt,
        "backends": backends,
        "notes": notes,
        "jetson": jetson,
    }


def _no_engines(bundle, backend: str) -> str | None:
    """Why ``bundle`` cannot be compared on TensorRT ``backend`` (no fp32 engines for this machine), or
    None."""
    if not backend_spec(backend).engines:
        return None
    from .backends import engine_forms
    from .bundle import Bundle

    try:
        forms = engine_forms(Bundle.open(bundle, verify_hashes=False), backend)
    except (BackendUnavailableError, EngineMismatchError) as e:
        return str(e)
    return (
        None
        if "fp32" in forms
        else f"the bundle's {backend} engines are {', '.join(sorted(forms))}; parity is checked at fp32"
    )


def tensorrt_flavours() -> dict:
    """{flavour: {"module", "version", "error"}}: which TensorRT Python modules really import here."""
    from .backends import ENGINE_FLAVOURS
    from .engines import import_flavour

    out = {}
    for flavour in ENGINE_FLAVOURS:
        try:
            module = import_flavour(flavour)
            out[flavour] = {"module": module.__name__, "version": module.__version__, "error": None}
        except BackendUnavailableError as e:
            out[flavour] = {"module": None, "version": None, "error": e.problem}
    return out
