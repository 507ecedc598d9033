"""Execution backends: how a component of a bundle becomes something that runs.

Each backend named here either runs as asked or raises BackendUnavailableError;
ONNX Runtime silently falls back to CPU when a GPU provider cannot load, so we
read back the providers a session really got instead of trusting the request.

``open_graph`` picks the implementation per backend: ``OrtGraph`` (ort-cpu: host
buffers), ``ort_gpu.OrtDeviceGraph`` (ort-cuda / ort-trt: device buffers, pinned
host arrays, CUDA graphs for the fused graph) and ``trt_graph.TrtGraph`` (trt /
trt-rtx: the bundle's prebuilt engines). The GPU modules, and tensorrt / CUDA,
are imported only when such a backend is used.
"""
from __future__ import annotations

import contextlib
import io
import os
from functools import lru_cache
from pathlib import Path

import numpy as np
import onnxruntime as ort

from .bundle import Component
from .errors import BackendUnavailableError, BadBundleError, BadInputError, EngineMismatchError

# Backend name -> the ONNX Runtime provider that must be active for it to count.
ORT_PROVIDERS = {
    "ort-cpu": "CPUExecutionProvider",
    "ort-cuda": "CUDAExecutionProvider",
    "ort-trt": "TensorrtExecutionProvider",
}
TRT_BACKENDS = ("trt", "trt-rtx")  # native TensorRT runtimes: need the bundle's engines for this GPU
BACKENDS = ("auto", *ORT_PROVIDERS, *TRT_BACKENDS)
# What `auto` tries, fastest first: prebuilt engines, then ONNX Runtime's TensorRT EP, CUDA, CPU.
AUTO_ORDER = ("trt", "trt-rtx", "ort-trt", "ort-cuda", "ort-cpu")
GPU_BACKENDS = ("ort-cuda", "ort-trt", *TRT_BACKENDS)
CUDA_GRAPHS_ENV = "EDGEGEN_CUDA_GRAPHS"  # "0" turns CUDA graph capture off (benchmarks compare both)
THREADS_ENV = "EDGEGEN_THREADS"  # ONNX Runtime intra-op threads per session (unset: ONNX Runtime's choice, all cores)

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
    """(True, "") if ``backend`` really loads here, else (False, why). ONNX Runtime backends are probed
    with a one-node model; TensorRT ones need their Python module and a GPU (whether a bundle has engines
    for this GPU is checked per bundle, by ``check_engines``)."""
    if backend in TRT_BACKENDS:
        from .engines import machine
        try:
            machine(backend)
        except BackendUnavailableError as e:
            return False, e.problem
        return True, ""
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


def require_backend(name: str) -> None:
    """BackendUnavailableError unless ``name`` loads here."""
    ok, why = backend_loads(name)
    if not ok:
        raise BackendUnavailableError(f"backend {name}", f"cannot run here: {why}",
                                      "run `edgegen doctor` to see which backends load, or use --backend auto")


def candidates(requested: str, bundle=None) -> list[str]:
    """The backends to try for ``requested``: itself, or for `auto` every backend fastest first (the
    TensorRT ones only with a bundle, whose engines decide whether they can run)."""
    check_backend_name(requested)
    if requested != "auto":
        return [requested]
    return [b for b in AUTO_ORDER if bundle is not None or b not in TRT_BACKENDS]


def engine_forms(bundle, backend: str) -> set[str] | None:
    """For a TensorRT backend, the forms whose engines this machine can use for every component the
    pipelines run (version, GPU and source checks; raises EngineMismatchError / BackendUnavailableError
    when there are none). None for ONNX Runtime backends (every form runs)."""
    if backend not in TRT_BACKENDS:
        return None
    from .engines import engine_forms as forms_of, engines_here, machine
    trt, version, cc = machine(backend)
    entries = engines_here(bundle, backend, version, cc)
    return forms_of(entries, [c for c in bundle.components if c != "judge"])


def resolve_backend(requested: str, bundle=None) -> tuple[str, list[str]]:
    """Return (backend, notes). A named backend that cannot run is an error; `auto` says what it skipped.
    With a bundle, a TensorRT backend counts only if the bundle has engines for this machine."""
    notes = []
    names = candidates(requested, bundle)
    for name in names:
        try:
            require_backend(name)
            if bundle is not None:
                engine_forms(bundle, name)
            return name, notes
        except (BackendUnavailableError, EngineMismatchError) as e:
            if requested != "auto":
                raise
            notes.append(skip_note(name, e))
    raise BackendUnavailableError("backend auto", "no backend loads on this machine", "; ".join(notes))


def skip_note(name: str, error: Exception) -> str:
    """What `auto` says about a backend it passed over."""
    problem = getattr(error, "problem", str(error))
    if problem.startswith("cannot run here: "):
        problem = problem[len("cannot run here: "):]
    subject = getattr(error, "subject", "")
    where = f" ({subject})" if subject and not subject.startswith("backend") else ""
    return f"{name} skipped: {problem}{where}"


def cuda_graphs_enabled() -> bool:
    return os.environ.get(CUDA_GRAPHS_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def session_options() -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3  # errors only: a provider fallback is detected by us, not by log lines
    threads = os.environ.get(THREADS_ENV, "").strip()
    if threads:  # an app sharing the CPU with other work caps edgegen's threads
        if not threads.isdigit() or int(threads) < 1:
            raise BadInputError(THREADS_ENV, f"expected a positive integer, got {threads!r}", f"unset it or set e.g. {THREADS_ENV}=1")
        opts.intra_op_num_threads = int(threads)
    return opts


def make_session(path: Path, backend: str, options: ort.SessionOptions | None = None,
                 provider_options: dict | None = None) -> ort.InferenceSession:
    """A session on exactly ``backend``; an error (not a silent CPU fallback) if its provider did not load."""
    if backend not in ORT_PROVIDERS:
        raise BadInputError("backend", f"{backend} runs prebuilt TensorRT engines, not ONNX files",
                            "run ONNX checks (validate, the judge) with an ONNX Runtime backend: "
                            + ", ".join(ORT_PROVIDERS))
    providers = _provider_chain(backend)
    if provider_options is not None:
        providers[0] = (providers[0], provider_options)
    if backend == "ort-trt":  # what TensorRT cannot take runs on CUDA, not on the CPU
        providers.insert(1, "CUDAExecutionProvider")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):  # where ONNX Runtime reports a provider that failed ("EP Error")
        session = ort.InferenceSession(str(path), options or session_options(), providers=providers)
    if ORT_PROVIDERS[backend] not in session.get_providers():
        ep_error = _ep_error(printed.getvalue())
        error = BackendUnavailableError(f"backend {backend}", f"{Path(path).name} did not get {ORT_PROVIDERS[backend]}"
                                        + (f": ONNX Runtime fell back to the CPU after {ep_error}" if ep_error else ""),
                                        "run `edgegen doctor` to see which backends load")
        error.ep_error = ep_error  # callers that asked for something optional (CUDA graphs) retry without it
        raise error
    return session


def _ep_error(printed: str) -> str | None:
    """The error ONNX Runtime's InferenceSession printed before retrying on the CPU, or None."""
    for line in printed.splitlines():
        if line.startswith("EP Error "):
            return line[len("EP Error "):][:400]
    return None


def open_graph(bundle, component: str, form: str, backend: str, cuda_graphs: bool | None = None):
    """The runnable graph of ``component`` in ``form`` on ``backend``: what every pipeline runs through.
    Each graph offers ``inputs(batch)`` / ``outputs(batch)`` (reusable arrays) and ``run(batch)``; GPU
    graphs keep their tensors on the device and their host arrays in pinned memory. Every graph also
    offers ``take(batch, input, source_graph, output)`` and ``run(batch, fetch=False)``, so one stage's
    output feeds the next without a host round trip (a plain copy on ort-cpu). Each also takes ``sequence=``
    (token positions): ort-cpu runs a graph with a dynamic token axis at it; the GPU graphs have one shape
    per batch size, at the bundle's max_length (``dynamic_sequence`` False), and the caller pads to it.

    ``cuda_graphs`` (default: on unless EDGEGEN_CUDA_GRAPHS=0): trt / trt-rtx capture every component
    per batch size; ort-cuda / ort-trt capture the static-shape fused graph."""
    spec = bundle.components.get(component)
    if spec is None:  # a manifest that lists fewer components than its family runs
        raise BadBundleError(f"bundle {bundle.root}", f"no {component!r} component in the manifest "
                             f"(it lists {sorted(bundle.components) or 'none'})", "re-export the bundle")
    graphs = cuda_graphs_enabled() if cuda_graphs is None else bool(cuda_graphs)
    if backend in TRT_BACKENDS:
        from .trt_graph import TrtGraph
        return TrtGraph(bundle, component, form, backend, spec, cuda_graphs=graphs)
    if backend in ("ort-cuda", "ort-trt"):
        from .ort_gpu import OrtDeviceGraph
        return OrtDeviceGraph(bundle, component, form, backend, spec, cuda_graph=graphs and component == "fused")
    return OrtGraph(bundle.onnx_path(component, form), backend, spec, bundle.max_length)


class OrtGraph:
    """One ONNX Runtime session with host buffers allocated once per shape and bound by IO binding.

    ``inputs(batch, sequence)`` returns the arrays to fill; ``run(batch, sequence=...)`` writes the outputs
    into the arrays that ``outputs(batch, sequence)`` returns. ``sequence`` (token positions) matters only
    for a graph with a dynamic sequence axis (``dynamic_sequence``); None means ``max_length``. Nothing is
    allocated on the per-call path after the first call at a shape.
    """

    def __init__(self, path: Path, backend: str, spec: Component, max_length: int):
        self.spec = spec
        self.backend = backend
        self.max_length = int(max_length)
        self.dynamic_sequence = spec.dynamic_sequence
        self.session = make_session(path, backend)
        self._sets: dict[tuple[int, int], tuple[dict, dict, ort.IOBinding]] = {}
        self._storage: dict[int, dict[str, np.ndarray]] = {}  # batch -> flat arrays sized for max_length

    def _buffers(self, batch: int, sequence: int | None):
        key = (batch, sequence or self.max_length)
        found = self._sets.get(key)
        if found is None:
            # Every token length at a batch size shares one allocation sized for max_length (its arrays are
            # contiguous views of the head), so memory grows with the batch sizes used, not with the lengths.
            tensors = (*self.spec.inputs, *self.spec.outputs)
            store = self._storage.get(batch)
            if store is None:
                store = self._storage[batch] = {t.name: np.zeros(int(np.prod(t.resolve(batch, self.max_length))),
                                                                 NP_DTYPES[t.dtype]) for t in tensors}
            view = {t.name: store[t.name][:int(np.prod(shape))].reshape(shape)
                    for t in tensors for shape in [t.resolve(*key)]}
            binding = self.session.io_binding()
            ins = {t.name: view[t.name] for t in self.spec.inputs}
            outs = {t.name: view[t.name] for t in self.spec.outputs}
            for name, arr in ins.items():
                binding.bind_input(name, "cpu", 0, arr.dtype, arr.shape, arr.ctypes.data)
            for name, arr in outs.items():
                binding.bind_output(name, "cpu", 0, arr.dtype, arr.shape, arr.ctypes.data)
            found = self._sets[key] = (ins, outs, binding)
        return found

    def inputs(self, batch: int, sequence: int | None = None) -> dict[str, np.ndarray]:
        return self._buffers(batch, sequence)[0]

    def outputs(self, batch: int, sequence: int | None = None) -> dict[str, np.ndarray]:
        return self._buffers(batch, sequence)[1]

    def run(self, batch: int, fetch: bool = True, sequence: int | None = None) -> dict[str, np.ndarray]:
        _, outs, binding = self._buffers(batch, sequence)
        self.session.run_with_iobinding(binding)
        return outs

    def take(self, batch: int, name: str, source, source_output: str, sequence: int | None = None) -> None:
        """Feed input ``name`` from ``source``'s output (on the host here: a copy into the bound array)."""
        self.inputs(batch, sequence)[name][...] = source.outputs(batch, sequence)[source_output]

    cuda_graphs = False
    graphs_captured: list = []
