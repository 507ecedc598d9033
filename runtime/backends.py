"""Execution backends: the table of what each one is, and how a component of a bundle becomes a graph.

``BACKEND_SPECS`` holds every fact about a backend (its ONNX Runtime providers, GPU or not, the int8 form
it runs, where `auto` tries it, which precision is fastest on it, its parity tolerance, where the judge
runs for it, the TensorRT flavour of its engines). Other modules read these facts; none tests a backend's
name. Adding a backend is one row here and, for a new kind of runtime, one graph module with an opener.

Each backend named here either runs as asked or raises BackendUnavailableError; ONNX Runtime silently
falls back to CPU when a GPU provider cannot load, so we read back the providers a session really got
instead of trusting the request.

Every graph satisfies ``Graph``: ``OrtGraph`` (here: host buffers), ``ort_gpu.OrtDeviceGraph`` (device
buffers, pinned host arrays, CUDA graphs for the fused graph) and ``trt_graph.TrtGraph`` (the bundle's
prebuilt engines). The GPU modules, and tensorrt / CUDA, are imported only when such a backend is used.
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import onnxruntime as ort

from .bundle import NP_DTYPES, Component
from .errors import BackendUnavailableError, BadBundleError, BadInputError, EngineMismatchError

CUDA_GRAPHS_ENV = "EDGEGEN_CUDA_GRAPHS"  # "0" turns CUDA graph capture off (benchmarks compare both)
THREADS_ENV = "EDGEGEN_THREADS"  # ONNX Runtime intra-op threads per session (unset: ONNX Runtime's choice)

# A one-node model, Identity(float[1]) at opset 17, serialized by hand: the lean runtime has no onnx package.
_PROBE_ONNX = b'\x08\x08\x12\x07edgegen:;\n\x10\n\x01x\x12\x01y"\x08Identity\x12\x05probeZ\x0f\n\x01x\x12\n\n\x08\x08\x01\x12\x04\n\x02\x08\x01b\x0f\n\x01y\x12\n\n\x08\x08\x01\x12\x04\n\x02\x08\x01B\x04\n\x00\x10\x11'  # noqa: E501


@runtime_checkable
class Graph(Protocol):
    """One component of a bundle, runnable on one backend: what every pipeline runs through.

    ``inputs(batch, sequence)`` / ``outputs(batch, sequence)`` return reusable arrays (pinned host memory
    on GPUs); ``run`` runs the graph on what was written into the inputs and returns the outputs
    (``fetch=False``: they stay on the device for the next stage's ``take``); ``take`` feeds an input
    from another graph's output without a host round trip where the backend can (a plain copy on the
    CPU). ``sequence`` is the number of token positions: a graph with ``dynamic_sequence`` runs at it;
    the others have one shape per batch size, at the bundle's max_length, and the caller pads to it.
    """

    dynamic_sequence: bool
    cuda_graphs: bool  # whether calls replay captured CUDA graphs

    def inputs(self, batch: int, sequence: int | None = None) -> dict[str, np.ndarray]: ...

    def outputs(self, batch: int, sequence: int | None = None) -> dict[str, np.ndarray]: ...

    def run(self, batch: int, fetch: bool = True, sequence: int | None = None) -> dict[str, np.ndarray]: ...

    def take(
        self, batch: int, name: str, source: Graph, source_output: str, sequence: int | None = None
    ) -> None: ...

    def close(self) -> None: ...


# How a row's graph is made: (bundle, component, form, backend, cuda_graphs, overrides) -> Graph, where
# overrides are initializers that replace the graph's own (LoRAs merged at load: ``lora.Overrides``) or None.
# Each imports its module only when called, so the lean runtime never imports CUDA or TensorRT bindings it
# does not use.
def _open_host_graph(
    bundle, component: str, form: str, backend: str, cuda_graphs: bool, overrides=None
) -> Graph:
    return OrtGraph(
        bundle.onnx_path(component, form),
        backend,
        bundle.components[component],
        bundle.max_length,
        overrides,
    )


def _open_device_graph(
    bundle, component: str, form: str, backend: str, cuda_graphs: bool, overrides=None
) -> Graph:
    from .ort_gpu import OrtDeviceGraph

    # ONNX Runtime captures a CUDA graph only of a static-shape graph: the fused one has no dynamic axis left
    return OrtDeviceGraph(
        bundle,
        component,
        form,
        backend,
        bundle.components[component],
        cuda_graph=cuda_graphs and component == "fused",
        overrides=overrides,
    )


def _open_engine_graph(
    bundle, component: str, form: str, backend: str, cuda_graphs: bool, overrides=None
) -> Graph:
    from .trt_graph import TrtGraph

    return TrtGraph(
        bundle,
        component,
        form,
        backend,
        bundle.components[component],
        cuda_graphs=cuda_graphs,
        overrides=overrides,
    )


@dataclass(frozen=True)
class EngineFlavour:
    """A native TensorRT runtime: it runs the bundle's prebuilt engines, not ONNX files."""

    title: str  # its product name, for messages
    modules: tuple[str, ...]  # its Python module, the first that imports
    install: str  # how to get that module
    # builds for any compute capability it names, with or without that GPU; a GPU it does not name cannot
    # run its engines (TensorRT for RTX). Otherwise it builds for the GPU present.
    builds_ahead: bool
    runtime_config: bool  # execution contexts are configured through an IRuntimeConfig (TensorRT for RTX)
    min_major: int = 0  # older major versions lack strongly typed networks or calls edgegen makes


CPU_SPEED_ORDER = ("int8", "fp32", "fp16")  # CPUs lack fast fp16 kernels
GPU_SPEED_ORDER = ("int8", "fp16", "fp32")  # GPUs run int8 QDQ and fp16 fastest


@dataclass(frozen=True)
class BackendSpec:
    """Everything the runtime needs to know about one backend."""

    name: str
    auto_rank: int  # `auto` tries backends by this, lowest first: the fastest that runs wins
    gpu: bool
    opens: Callable[..., Graph]  # makes a component's graph (see _open_*_graph)
    providers: tuple[str, ...] = ()  # ONNX Runtime providers, asked in this order; the first must load
    engines: EngineFlavour | None = None  # set for native TensorRT backends, which run prebuilt engines
    int8_form: str = "int8-qdq"  # which file int8 runs as: "int8" (CPU ops) or "int8-qdq" (standard QDQ)
    speed_order: tuple[str, ...] = GPU_SPEED_ORDER  # precisions fastest first, for precision="auto"
    pixel_tolerance: int = 1  # doctor: largest uint8 difference from PyTorch's pixels at fp32
    judge_on: tuple[str, ...] = ()  # runs no ONNX file: the judge runs on the first of these that loads

    @property
    def provider(self) -> str | None:
        """The ONNX Runtime provider that must be active for the backend to count (None: not ONNX Runtime)."""
        return self.providers[0] if self.providers else None


# fmt: off
CPU_EP, CUDA_EP, TENSORRT_EP = "CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"
TENSORRT = EngineFlavour("TensorRT", ("tensorrt",), builds_ahead=False, runtime_config=False, min_major=10,
                         install="install TensorRT 10 (on Jetson it comes with JetPack: python3-libnvinfer)")
TENSORRT_RTX = EngineFlavour("TensorRT for RTX", ("tensorrt_rtx", "tensorrt_rtx_bindings"), builds_ahead=True,
                             runtime_config=True, install="pip install 'edgegen[tensorrt-rtx]'")
_ENGINE_JUDGE = ("ort-cuda", "ort-cpu")  # engines have no judge: score with ONNX Runtime, the GPU if it loads

# One row per backend. ort-trt: what TensorRT cannot take runs on CUDA, not on the CPU. TensorRT runs fp32
# with TF32 and its own fusions: one more uint8 level is allowed there (not yet measured on a GPU).
BACKEND_SPECS: dict[str, BackendSpec] = {spec.name: spec for spec in (
    BackendSpec("ort-cpu", auto_rank=5, gpu=False, opens=_open_host_graph, providers=(CPU_EP,),
                int8_form="int8", speed_order=CPU_SPEED_ORDER),
    BackendSpec("ort-cuda", auto_rank=4, gpu=True, opens=_open_device_graph, providers=(CUDA_EP, CPU_EP)),
    BackendSpec("ort-trt", auto_rank=3, gpu=True, opens=_open_device_graph,
                providers=(TENSORRT_EP, CUDA_EP, CPU_EP), pixel_tolerance=2),
    BackendSpec("trt", auto_rank=1, gpu=True, opens=_open_engine_graph, engines=TENSORRT,
                pixel_tolerance=2, judge_on=_ENGINE_JUDGE),
    BackendSpec("trt-rtx", auto_rank=2, gpu=True, opens=_open_engine_graph, engines=TENSORRT_RTX,
                pixel_tolerance=2, judge_on=_ENGINE_JUDGE),
)}
# fmt: on
BACKENDS = ("auto", *BACKEND_SPECS)  # what --backend accepts
ENGINE_FLAVOURS = tuple(name for name, spec in BACKEND_SPECS.items() if spec.engines)  # --flavour choices


def flavour_choices() -> str:
    """The engine flavours in words, for messages: "trt (TensorRT) or trt-rtx (TensorRT for RTX)"."""
    return " or ".join(f"{name} ({BACKEND_SPECS[name].engines.title})" for name in ENGINE_FLAVOURS)


def backend_spec(name: str) -> BackendSpec:
    """The table's row for backend ``name``; BadInputError for a name it does not know (or `auto`)."""
    spec = BACKEND_SPECS.get(name)
    if spec is None:
        raise BadInputError(
            "backend", f"unknown backend: {name!r}", f"choose one of {', '.join(BACKEND_SPECS)}"
        )
    return spec


def check_backend_name(name: str) -> str:
    if name != "auto" and name not in BACKEND_SPECS:
        raise BadInputError(
            "backend", f"unknown backend: {name!r}", f"choose one of auto, {', '.join(BACKEND_SPECS)}"
        )
    return name


def auto_order() -> list[str]:
    """Every backend, in the order `auto` tries them (the table's ``auto_rank``, fastest first)."""
    return sorted(BACKEND_SPECS, key=lambda name: BACKEND_SPECS[name].auto_rank)


@cache
def backend_loads(backend: str) -> tuple[bool, str]:
    """(True, "") if ``backend`` really loads here, else (False, why). ONNX Runtime backends are probed
    with a one-node model; TensorRT ones need their Python module and a GPU (whether a bundle has engines
    for this GPU is checked per bundle, by ``engine_forms``)."""
    spec = backend_spec(backend)
    if spec.engines:
        from .engines import machine

        try:
            machine(backend)
        except BackendUnavailableError as e:
            return False, e.problem
        return True, ""
    provider = spec.provider
    if provider not in ort.get_available_providers():
        return False, f"onnxruntime {ort.__version__} ({ort.get_device()} build) has no {provider}"
    # A provider whose libraries are missing makes ONNX Runtime log errors and print a fallback
    # notice; both are noise here, since the outcome is read back from the session.
    ort.set_default_logger_severity(4)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            session = ort.InferenceSession(_PROBE_ONNX, session_options(), providers=list(spec.providers))
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
        raise BackendUnavailableError(
            f"backend {name}",
            f"cannot run here: {why}",
            "run `edgegen doctor` to see which backends load, or use --backend auto",
        )


def candidates(requested: str, bundle=None) -> list[str]:
    """The backends to try for ``requested``: itself, or for `auto` every backend fastest first (the
    TensorRT ones only with a bundle, whose engines decide whether they can run)."""
    check_backend_name(requested)
    if requested != "auto":
        return [requested]
    return [b for b in auto_order() if bundle is not None or not BACKEND_SPECS[b].engines]


def engine_forms(bundle, backend: str) -> set[str] | None:
    """For a TensorRT backend, the forms whose engines this machine can use for every component the
    pipelines run (version, GPU and source checks; raises EngineMismatchError / BackendUnavailableError
    when there are none). None for ONNX Runtime backends (every form runs)."""
    if not backend_spec(backend).engines:
        return None
    from .engines import engine_forms as forms_of
    from .engines import engines_here, machine

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
        problem = problem[len("cannot run here: ") :]
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
            raise BadInputError(
                THREADS_ENV,
                f"expected a positive integer, got {threads!r}",
                f"unset it or set e.g. {THREADS_ENV}=1",
            )
        opts.intra_op_num_threads = int(threads)
    return opts


def add_overrides(options: ort.SessionOptions, overrides) -> list:
    """Replace initializers stored as external data by name (LoRA weights merged at load). Returns the
    OrtValues, which the caller keeps as long as the session: ONNX Runtime uses their memory, it does not
    copy it. (``add_initializer`` is silently ignored for such weights at ORT_ENABLE_ALL, ONNX Runtime 1.31;
    ``add_external_initializers`` is the call made for external data.)"""
    if overrides is None:
        return []
    values = [ort.OrtValue.ortvalue_from_numpy(a) for a in overrides.arrays.values()]
    options.add_external_initializers(list(overrides.arrays), values)
    return values


def make_session(
    path: Path, backend: str, options: ort.SessionOptions | None = None, provider_options: dict | None = None
) -> ort.InferenceSession:
    """A session on exactly ``backend``; an error (not a silent CPU fallback) if its provider did not load."""
    spec = backend_spec(backend)
    if spec.provider is None:
        raise BadInputError(
            "backend",
            f"{backend} runs prebuilt TensorRT engines, not ONNX files",
            "run ONNX checks (validate, the judge) with an ONNX Runtime backend: "
            + ", ".join(ort_backends()),
        )
    providers: list = list(spec.providers)
    if provider_options is not None:
        providers[0] = (providers[0], provider_options)
    printed = io.StringIO()  # where ONNX Runtime reports a provider that failed ("EP Error")
    with contextlib.redirect_stdout(printed):
        session = ort.InferenceSession(str(path), options or session_options(), providers=providers)
    if spec.provider not in session.get_providers():
        ep_error = _ep_error(printed.getvalue())
        fell_back = f": ONNX Runtime fell back to the CPU after {ep_error}" if ep_error else ""
        error = BackendUnavailableError(
            f"backend {backend}",
            f"{Path(path).name} did not get {spec.provider}{fell_back}",
            "run `edgegen doctor` to see which backends load",
        )
        error.ep_error = ep_error  # callers that asked for something optional (CUDA graphs) retry without it
        raise error
    return session


def _ep_error(printed: str) -> str | None:
    """The error ONNX Runtime's InferenceSession printed before retrying on the CPU, or None."""
    for line in printed.splitlines():
        if line.startswith("EP Error "):
            return line[len("EP Error ") :][:400]
    return None


def ort_backends() -> list[str]:
    """The backends that run ONNX files through ONNX Runtime."""
    return [name for name, spec in BACKEND_SPECS.items() if spec.provider]


def open_graph(
    bundle, component: str, form: str, backend: str, cuda_graphs: bool | None = None, overrides=None
) -> Graph:
    """The runnable ``Graph`` of ``component`` in ``form`` on ``backend``, made by its row's opener.

    ``cuda_graphs`` (default: on unless EDGEGEN_CUDA_GRAPHS=0): trt / trt-rtx capture every component
    per batch size; ort-cuda / ort-trt capture the static-shape fused graph. ``overrides``: initializers
    replacing the graph's own (LoRAs merged at load), or None: ONNX Runtime backends hand them to the
    session; TensorRT backends refit an engine built refittable with them (not verified on a GPU)."""
    spec = bundle.components.get(component)
    if spec is None:  # a manifest that lists fewer components than its family runs
        raise BadBundleError(
            f"bundle {bundle.root}",
            f"no {component!r} component in the manifest (it lists {sorted(bundle.components) or 'none'})",
            "re-export the bundle",
        )
    graphs = cuda_graphs_enabled() if cuda_graphs is None else bool(cuda_graphs)
    return backend_spec(backend).opens(bundle, component, form, backend, graphs, overrides)


@dataclass(slots=True)
class BoundSet:
    """One shape's host arrays and the IO binding that points the session at them."""

    inputs: dict[str, np.ndarray]
    outputs: dict[str, np.ndarray]
    binding: ort.IOBinding


class OrtGraph:
    """One ONNX Runtime session with host buffers allocated once per shape and bound by IO binding.

    ``inputs(batch, sequence)`` returns the arrays to fill; ``run(batch, sequence=...)`` writes the outputs
    into the arrays that ``outputs(batch, sequence)`` returns. ``sequence`` (token positions) matters only
    for a graph with a dynamic sequence axis (``dynamic_sequence``); None means ``max_length``. Nothing is
    allocated on the per-call path after the first call at a shape.
    """

    cuda_graphs = False  # host buffers: nothing to capture

    def __init__(self, path: Path, backend: str, spec: Component, max_length: int, overrides=None):
        self.spec = spec
        self.backend = backend
        self.max_length = int(max_length)
        self.dynamic_sequence = spec.dynamic_sequence
        options = session_options()
        self._overrides = add_overrides(options, overrides)  # alive as long as the session
        self.session = make_session(path, backend, options)
        self._sets: dict[tuple[int, int], BoundSet] = {}  # (batch, sequence) -> its bound buffers
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
                store = self._storage[batch] = {
                    t.name: np.zeros(int(np.prod(t.resolve(batch, self.max_length))), NP_DTYPES[t.dtype])
                    for t in tensors
                }
            view = {
                t.name: store[t.name][: int(np.prod(shape))].reshape(shape)
                for t in tensors
                for shape in [t.resolve(*key)]
            }
            binding = self.session.io_binding()
            ins = {t.name: view[t.name] for t in self.spec.inputs}
            outs = {t.name: view[t.name] for t in self.spec.outputs}
            for name, arr in ins.items():
                binding.bind_input(name, "cpu", 0, arr.dtype, arr.shape, arr.ctypes.data)
            for name, arr in outs.items():
                binding.bind_output(name, "cpu", 0, arr.dtype, arr.shape, arr.ctypes.data)
            found = self._sets[key] = BoundSet(ins, outs, binding)
        return found

    def inputs(self, batch: int, sequence: int | None = None) -> dict[str, np.ndarray]:
        return self._buffers(batch, sequence).inputs

    def outputs(self, batch: int, sequence: int | None = None) -> dict[str, np.ndarray]:
        return self._buffers(batch, sequence).outputs

    def run(self, batch: int, fetch: bool = True, sequence: int | None = None) -> dict[str, np.ndarray]:
        bound = self._buffers(batch, sequence)
        self.session.run_with_iobinding(bound.binding)
        return bound.outputs

    def take(self, batch: int, name: str, source, source_output: str, sequence: int | None = None) -> None:
        """Feed input ``name`` from ``source``'s output (on the host here: a copy into the bound array)."""
        self.inputs(batch, sequence)[name][...] = source.outputs(batch, sequence)[source_output]

    graphs_captured: list = []

    def close(self) -> None:
        """Drop the session and its buffers (the arrays handed out stay valid: they are numpy's)."""
        self._sets.clear()
        self._storage.clear()
        self.session = None
