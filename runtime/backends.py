"""Execution backends: how a component's ONNX file becomes something that runs.

Each backend named here either runs as asked or raises BackendUnavailableError;
ONNX Runtime silently falls back to CPU when a GPU provider cannot load, so we
read back the providers a session really got instead of trusting the request.
"""
from __future__ import annotations

import contextlib
import io
from functools import lru_cache
from pathlib import Path

import numpy as np
import onnxruntime as ort

from .bundle import Component
from .errors import BackendUnavailableError, BadInputError

# Backend name -> the ONNX Runtime provider that must be active for it to count.
ORT_PROVIDERS = {
    "ort-cpu": "CPUExecutionProvider",
    "ort-cuda": "CUDAExecutionProvider",
    "ort-trt": "TensorrtExecutionProvider",
}
BACKENDS = ("auto", *ORT_PROVIDERS)
# What `auto` tries, fastest first.
AUTO_ORDER = ("ort-trt", "ort-cuda", "ort-cpu")

# A one-node model, Identity(float[1]) at opset 17, serialized by hand: the lean runtime has no onnx package.
_PROBE_ONNX = b'\x08\x08\x12\x07edgegen:;\n\x10\n\x01x\x12\x01y"\x08Identity\x12\x05probeZ\x0f\n\x01x\x12\n\n\x08\x08\x01\x12\x04\n\x02\x08\x01b\x0f\n\x01y\x12\n\n\x08\x08\x01\x12\x04\n\x02\x08\x01B\x04\n\x00\x10\x11'

NP_DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32,
             "uint8": np.uint8, "bool": np.bool_}


def check_backend_name(name: str) -> str:
    if name not in BACKENDS:
        raise BadInputError("backend", f"unknown backend: {name!r}", f"choose one of {', '.join(BACKENDS)}")
    return name


def _provider_chain(backend: str) -> list:
    if backend == "ort-cpu":
        return ["CPUExecutionProvider"]
    return [ORT_PROVIDERS[backend], "CPUExecutionProvider"]


@lru_cache(maxsize=None)
def backend_loads(backend: str) -> tuple[bool, str]:
    """(True, "") if ``backend`` really loads here, else (False, why). Probes with a one-node model."""
    provider = ORT_PROVIDERS[backend]
    if provider not in ort.get_available_providers():
        return False, f"onnxruntime {ort.__version__} ({ort.get_device()} build) has no {provider}"
    # A provider whose libraries are missing makes ONNX Runtime log errors and print a fallback
    # notice; both are noise here, since the outcome is read back from the session.
    ort.set_default_logger_severity(4)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            session = ort.InferenceSession(_PROBE_ONNX, session_options(), providers=_provider_chain(backend))
    except Exception as e:  # a provider library that fails to load raises here on some builds
        return False, f"{provider} failed to start: {str(e).splitlines()[0]}"
    finally:
        ort.set_default_logger_severity(3)
    if provider not in session.get_providers():
        return False, f"{provider} is listed but did not load (missing CUDA/cuDNN/TensorRT libraries?)"
    return True, ""


def resolve_backend(requested: str) -> tuple[str, list[str]]:
    """Return (backend, notes). A named backend that cannot run is an error; `auto` says what it skipped."""
    check_backend_name(requested)
    if requested != "auto":
        ok, why = backend_loads(requested)
        if not ok:
            raise BackendUnavailableError(f"backend {requested}", f"cannot run here: {why}",
                                          "run `edgegen doctor` to see which backends load, or use --backend auto")
        return requested, []
    notes = []
    for name in AUTO_ORDER:
        ok, why = backend_loads(name)
        if ok:
            return name, notes
        notes.append(f"{name} skipped: {why}")
    raise BackendUnavailableError("backend auto", "no backend loads on this machine", "; ".join(notes))


def session_options() -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3  # errors only: a provider fallback is detected by us, not by log lines
    return opts


def make_session(path: Path, backend: str) -> ort.InferenceSession:
    """A session on exactly ``backend``; an error (not a silent CPU fallback) if its provider did not load."""
    session = ort.InferenceSession(str(path), session_options(), providers=_provider_chain(backend))
    if ORT_PROVIDERS[backend] not in session.get_providers():
        raise BackendUnavailableError(f"backend {backend}", f"{Path(path).name} did not get {ORT_PROVIDERS[backend]}",
                                      "run `edgegen doctor` to see which backends load")
    return session


def open_graph(bundle, component: str, form: str, backend: str) -> "OrtGraph":
    """The runnable graph of ``component`` in ``form`` on ``backend``: what every pipeline runs through.
    Each graph offers ``inputs(batch)`` / ``outputs(batch)`` (reusable arrays) and ``run(batch)``."""
    return OrtGraph(bundle.onnx_path(component, form), backend, bundle.components[component])


class OrtGraph:
    """One ONNX Runtime session with host buffers allocated once per batch size and bound by IO binding.

    ``inputs(batch)`` returns the arrays to fill; ``run(batch)`` writes the outputs into the arrays that
    ``outputs(batch)`` returns. Nothing is allocated on the per-call path after the first call at a size.
    """

    def __init__(self, path: Path, backend: str, spec: Component):
        self.spec = spec
        self.backend = backend
        self.session = make_session(path, backend)
        self._sets: dict[int, tuple[dict, dict, ort.IOBinding]] = {}

    def _buffers(self, batch: int):
        found = self._sets.get(batch)
        if found is None:
            binding = self.session.io_binding()
            ins = {t.name: _alloc(t, batch) for t in self.spec.inputs}
            outs = {t.name: _alloc(t, batch) for t in self.spec.outputs}
            for name, arr in ins.items():
                binding.bind_input(name, "cpu", 0, arr.dtype, arr.shape, arr.ctypes.data)
            for name, arr in outs.items():
                binding.bind_output(name, "cpu", 0, arr.dtype, arr.shape, arr.ctypes.data)
            found = self._sets[batch] = (ins, outs, binding)
        return found

    def inputs(self, batch: int) -> dict[str, np.ndarray]:
        return self._buffers(batch)[0]

    def outputs(self, batch: int) -> dict[str, np.ndarray]:
        return self._buffers(batch)[1]

    def run(self, batch: int) -> dict[str, np.ndarray]:
        _, outs, binding = self._buffers(batch)
        self.session.run_with_iobinding(binding)
        return outs


def _alloc(spec, batch: int) -> np.ndarray:
    shape = tuple(batch if isinstance(d, str) else int(d) for d in spec.shape)
    return np.zeros(shape, dtype=NP_DTYPES[spec.dtype])
