"""TensorRT engines in a bundle: which flavour and version built them, for which GPU, and whether this
machine can use them. Checked before any engine is deserialized. tensorrt / tensorrt_rtx are imported
lazily and only here."""
from __future__ import annotations

import importlib

from .errors import BackendUnavailableError, EngineMismatchError

FLAVOURS = {"trt": ("tensorrt",), "trt-rtx": ("tensorrt_rtx", "tensorrt_rtx_bindings")}


def import_flavour(flavour: str):
    """The TensorRT Python module of ``flavour``, or BackendUnavailableError saying how to install it."""
    for name in FLAVOURS[flavour]:
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    hint = ("pip install 'edgegen[tensorrt-rtx]'" if flavour == "trt-rtx" else
            "install TensorRT 10 (on Jetson it comes with JetPack: python3-libnvinfer)")
    raise BackendUnavailableError(f"backend {flavour}", f"its Python module ({' or '.join(FLAVOURS[flavour])}) is not installed",
                                  hint)


def engine_dir(flavour: str, version: str, compute_capability: str) -> str:
    return f"engines/{flavour}-{version}-sm{compute_capability.replace('.', '')}"


def select_engines(manifest: dict, flavour: str, version: str, compute_capability: str | None, rebuild_hint: str) -> list[dict]:
    """The engines of ``flavour`` built by this TensorRT version for this GPU; refuses the others by name."""
    entries = [e for e in manifest.get("engines", []) if e.get("flavour") == flavour]
    subject = f"bundle engines ({flavour})"
    if not entries:
        raise BackendUnavailableError(subject, "the bundle has no engines of this flavour",
                                      f"build them: {rebuild_hint}; or use --backend ort-cuda / ort-cpu")
    versions = sorted({e["version"] for e in entries})
    if version not in versions:
        raise EngineMismatchError(subject, f"built with {flavour} {', '.join(versions)}, this machine has {version}",
                                  f"engines are not portable across TensorRT versions: rebuild with {rebuild_hint}, "
                                  "or use --backend ort-cuda")
    entries = [e for e in entries if e["version"] == version]
    if compute_capability is not None:
        archs = sorted({e["compute_capability"] for e in entries})
        if compute_capability not in archs:
            raise EngineMismatchError(subject, f"built for compute capability {', '.join(archs)}, this GPU is {compute_capability}",
                                      f"engines are not portable across GPUs: rebuild on this machine with {rebuild_hint}, "
                                      "or use --backend ort-cuda")
        entries = [e for e in entries if e["compute_capability"] == compute_capability]
    return entries


def check_sources(manifest: dict, entries: list[dict]) -> None:
    """Each engine must come from the ONNX file the bundle ships now (same sha256)."""
    for e in entries:
        onnx_entry = manifest["files"].get(e["onnx"])
        if onnx_entry is None or onnx_entry["sha256"] != e["onnx_sha256"]:
            raise EngineMismatchError(f"engine {e['file']}", f"was built from another version of {e['onnx']}",
                                      "rebuild the engines (edgegen export ... --engines) after changing the ONNX files")
