"""ONNX Runtime on the GPU (backends ``ort-cuda`` and ``ort-trt``): inputs and outputs live in device
OrtValues bound once per batch size with IO binding, the pipeline fills page-locked (pinned) host arrays
that are copied up before a run and down after it, and the static-shape fused graph is replayed as a CUDA
graph (one ONNX Runtime session, hence one graph, per batch size).

Where the ORT TensorRT EP keeps what it builds: bundles are verified by hash and may be read-only, so the
runtime never writes into them. Its engine and timing caches live in the user cache, keyed by the bundle's
content, the TensorRT version and the GPU::

    $EDGEGEN_CACHE (or ~/.cache/edgegen)/ort-trt/<manifest sha256[:16]>/ort-trt-<TRT version>-sm<cc>/
        timing/                          the timing cache, shared by every session of the bundle
        <component>.<form>/dynamic/      the engine for batches 1..max_batch (one profile)
        <component>.<form>/b<N>/         the static batch-N engine of a CUDA-graph session

A re-exported bundle has another manifest hash, so it never picks up stale engines; deleting the directory
only costs the next start-up a rebuild.
"""

from __future__ import annotations

import ctypes
import os
import re
from pathlib import Path

import numpy as np
import onnxruntime as ort

from . import cudart
from .backends import TENSORRT_EP, backend_spec
from .bundle import NP_DTYPES, SEQUENCE_AXIS, Component
from .engines import bundle_key, user_cache_dir
from .errors import BackendUnavailableError, BadInputError

ORT_DEVICE = "cuda"
# libnvinfer names, newest first: PyPI's tensorrt>=10 installs 11.x now
NVINFER_LIBS = {
    "posix": ["libnvinfer.so.11", "libnvinfer.so.10", "libnvinfer.so"],
    "nt": ["nvinfer_11.dll", "nvinfer_10.dll", "nvinfer.dll"],
}
# ONNX Runtime's CUDA EP runs a graph once plainly (allocating), then captures it on the next run
ORT_SETUP_RUNS = 2


def tensorrt_version() -> str | None:
    """The TensorRT version ONNX Runtime's TensorRT EP will load (libnvinfer's own answer), or None."""
    names = NVINFER_LIBS["nt" if os.name == "nt" else "posix"]
    try:  # one already loaded by the EP
        names = [
            line.split()[-1]
            for line in Path("/proc/self/maps").read_text().splitlines()
            if re.search(r"/libnvinfer\.so", line)
        ][:1] + names
    except OSError:
        pass
    for name in names:
        try:
            fn = ctypes.CDLL(name).getInferLibVersion
        except (OSError, AttributeError):
            continue
        fn.restype = ctypes.c_int32
        v = fn()
        return (
            f"{v // 10000}.{v // 100 % 100}.{v % 100}"
            if v >= 10000
            else f"{v // 1000}.{v // 100 % 10}.{v % 100}"
        )
    return None


def ort_trt_cache_dir(bundle) -> Path:
    cc = (cudart.compute_capability() or "unknown").replace(".", "")
    return (
        user_cache_dir()
        / "ort-trt"
        / bundle_key(bundle)
        / f"ort-trt-{tensorrt_version() or 'unknown'}-sm{cc}"
    )


class _BatchSet:
    __slots__ = ("session", "binding", "host_in", "host_out", "dev", "h2d", "d2h", "fed", "runs")

    def __init__(self):
        self.host_in, self.host_out, self.dev, self.h2d, self.d2h, self.fed = {}, {}, {}, [], [], set()
        self.runs = 0


class OrtDeviceGraph:
    """One component on ort-cuda / ort-trt. Same interface as OrtGraph (``inputs``, ``outputs``, ``run``),
    plus ``take`` and ``run(fetch=False)`` so a stage's output can feed the next stage on the device.

    ``cuda_graph``: one session per batch size with the batch dimension fixed (so shape computations fold
    away and every node stays on the GPU), created with CUDA graph capture on; ONNX Runtime captures it on
    an early run and replays it afterwards. Otherwise one session serves every batch size. ONNX Runtime
    refuses the capture when a node would run on the CPU (or, on ort-trt, outside TensorRT): that batch
    size then gets a session without capture, and ``notes`` says why.
    """

    kind = "onnxruntime"

    def __init__(
        self,
        bundle,
        component: str,
        form: str,
        backend: str,
        spec: Component,
        cuda_graph: bool = False,
        overrides=None,
    ):
        self.cuda = cudart.runtime()
        self.stream = self.cuda.stream()
        self.spec, self.backend, self.form, self.component = spec, backend, form, component
        self.path = bundle.onnx_path(component, form)
        self.cuda_graphs = bool(cuda_graph)
        self.max_batch = int(bundle.generation["max_batch"])
        self.max_length = bundle.max_length  # fixed shapes: the sequence axis always at max_length
        self.provider = backend_spec(backend).provider
        self.cache_dir = ort_trt_cache_dir(bundle) if self.provider == TENSORRT_EP else None
        self.overrides, self._kept = overrides, []  # the kept OrtValues live as long as the sessions
        if self.cache_dir and overrides is not None:  # engines built with merged LoRA weights
            self.cache_dir = self.cache_dir / f"lora-{overrides.key}"
        self.notes: list[str] = []
        self._uncaptured: set[int] = set()  # batch sizes whose session runs without CUDA graph capture
        self._sets: dict[int, _BatchSet] = {}
        self._shared = None if self.cuda_graphs else self._session(None)
        if self.cuda_graphs:
            self._buffers(1)  # fail at load, not at the first call

    def _provider_options(self, batch: int | None, capture: bool = True) -> dict:
        capture = capture and batch is not None
        if self.provider != TENSORRT_EP:  # the CUDA provider's options
            return {"device_id": "0", "enable_cuda_graph": "1" if capture else "0"}
        where = (
            self.cache_dir / f"{self.component}.{self.form}" / ("dynamic" if batch is None else f"b{batch}")
        )
        timing = self.cache_dir / "timing"
        for d in (where, timing):
            d.mkdir(parents=True, exist_ok=True)
        opts = {
            "device_id": "0",
            "trt_engine_cache_enable": "True",
            "trt_engine_cache_path": str(where),
            "trt_timing_cache_enable": "True",
            "trt_timing_cache_path": str(timing),
            "trt_cuda_graph_enable": "True" if capture else "False",
            # the EP builds weakly typed networks: let it use the precision this form was exported for
            "trt_fp16_enable": "True" if self.form in ("fp16", "int8-qdq") else "False",
            "trt_int8_enable": "True" if self.form == "int8-qdq" else "False",
        }
        if batch is None:  # one profile for every batch size the bundle allows
            for key, b in (("min", 1), ("opt", 1), ("max", self.max_batch)):
                opts[f"trt_profile_{key}_shapes"] = ",".join(
                    f"{t.name}:{'x'.join(str(d) for d in t.resolve(b, self.max_length))}"
                    for t in self.spec.inputs
                )
        return opts

    def _session(self, batch: int | None) -> ort.InferenceSession:
        from .backends import make_session

        try:
            return make_session(self.path, self.backend, self._options(batch), self._provider_options(batch))
        except BackendUnavailableError as e:
            if batch is None or not getattr(e, "ep_error", None):
                raise
            refused = e.ep_error
        self.notes.append(
            f"{self.path.name} batch {batch}: no CUDA graph (ONNX Runtime refused the capture: "
            f"{refused}); running without one"
        )
        self._uncaptured.add(batch)
        return make_session(
            self.path, self.backend, self._options(batch), self._provider_options(batch, False)
        )

    def _options(self, batch: int | None) -> ort.SessionOptions:
        from .backends import add_overrides, session_options

        opts = session_options()
        self._kept += add_overrides(opts, self.overrides)
        if batch is not None:
            for name in {d for t in self.spec.inputs for d in t.shape if isinstance(d, str)}:
                opts.add_free_dimension_override_by_name(
                    name, self.max_length if name == SEQUENCE_AXIS else batch
                )
        return opts

    def _buffers(self, batch: int) -> _BatchSet:
        found = self._sets.get(batch)
        if found is not None:
            return found
        if not 1 <= batch <= self.max_batch:
            raise BadInputError("batch", f"{batch} is outside 1..{self.max_batch}", "split the request")
        with cudart.SETUP_LOCK:  # sessions and buffers: no other thread's capture meanwhile
            return self._allocate(batch)

    def _allocate(self, batch: int) -> _BatchSet:
        s = _BatchSet()
        s.session = self._shared or self._session(batch)
        s.binding = s.session.io_binding()
        for t in (*self.spec.inputs, *self.spec.outputs):
            shape, dtype = t.resolve(batch, self.max_length), NP_DTYPES[t.dtype]
            host = self.cuda.pinned(shape, dtype)
            dev = s.dev[t.name] = ort.OrtValue.ortvalue_from_shape_and_type(shape, dtype, ORT_DEVICE, 0)
            if t in self.spec.inputs:
                s.binding.bind_ortvalue_input(t.name, dev)
                s.host_in[t.name] = host
                s.h2d.append((t.name, dev.data_ptr(), host.ctypes.data, host.nbytes))
            else:
                s.binding.bind_ortvalue_output(t.name, dev)
                s.host_out[t.name] = host
                s.d2h.append((host.ctypes.data, dev.data_ptr(), host.nbytes))
        self._sets[batch] = s
        return s

    dynamic_sequence = (
        False  # one shape per batch size (CUDA graphs, TensorRT profiles): padded to max_length
    )

    def inputs(self, batch: int, sequence: int | None = None) -> dict[str, np.ndarray]:
        s = self._buffers(batch)
        s.fed.clear()
        return s.host_in

    def outputs(self, batch: int, sequence: int | None = None) -> dict[str, np.ndarray]:
        return self._buffers(batch).host_out

    def device_output(self, batch: int, name: str) -> tuple[int, int]:
        value = self._buffers(batch).dev[name]
        return value.data_ptr(), int(np.prod(value.shape())) * np.dtype(
            NP_DTYPES[_dtype_of(self.spec, name)]
        ).itemsize

    def take(self, batch: int, name: str, source, source_output: str, sequence: int | None = None) -> None:
        s = self._buffers(batch)
        src, nbytes = source.device_output(batch, source_output)
        _, dst, _, need = next(h for h in s.h2d if h[0] == name)
        if nbytes != need:
            raise BadInputError(
                name,
                f"{source_output} has {nbytes} bytes, {name} needs {need}",
                "connect tensors of the same shape and dtype",
            )
        self.cuda.copy(dst, src, nbytes, cudart.DEVICE_TO_DEVICE, self.stream)
        s.fed.add(name)

    def run(self, batch: int, fetch: bool = True, sequence: int | None = None) -> dict[str, np.ndarray]:
        s = self._sets.get(batch) or self._buffers(batch)
        cuda, stream, fed = self.cuda, self.stream, s.fed
        for name, dst, src, nbytes in s.h2d:
            if name not in fed:
                cuda.copy(dst, src, nbytes, cudart.HOST_TO_DEVICE, stream)
        cuda.sync(stream)  # ONNX Runtime runs on its own stream: the inputs must be there first
        if (
            s.runs < ORT_SETUP_RUNS
        ):  # ONNX Runtime allocates, then captures (global mode): one thread at a time
            with cudart.SETUP_LOCK:
                s.session.run_with_iobinding(s.binding)
            s.runs += 1
        else:
            s.session.run_with_iobinding(s.binding)  # returns once the GPU work is done (ORT synchronises)
        if fetch:
            for dst, src, nbytes in s.d2h:
                cuda.copy(dst, src, nbytes, cudart.DEVICE_TO_HOST, stream)
            cuda.sync(stream)
        return s.host_out

    @property
    def graphs_captured(self) -> list[int]:
        return sorted(set(self._sets) - self._uncaptured) if self.cuda_graphs else []

    def close(self) -> None:
        """Drop the sessions and their bound buffers (device memory and pinned arrays go with them)."""
        self._sets.clear()
        self._shared = None


def _dtype_of(spec: Component, name: str) -> str:
    return next(t.dtype for t in (*spec.inputs, *spec.outputs) if t.name == name)
