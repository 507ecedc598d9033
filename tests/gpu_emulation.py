"""A host emulation of the CUDA runtime and of a TensorRT engine, so the GPU graphs' bookkeeping (buffers,
addresses, copies, take/fetch, CUDA-graph capture and replay, no allocation per call) runs in CI.

HostCuda has cudart.Cuda's methods: "device" memory is host memory, copies are memmove, work on a stream
runs at once, except on a stream that is capturing: there it is recorded (whichever thread enqueues it, as
on a GPU), and launching the graph replays the record. So a graph that captured the wrong buffers, or a
copy left out of the per-call path, gives wrong pixels here.

FakeEngine runs a component's ONNX file with ONNX Runtime on the CPU, reading its inputs from and writing
its outputs to the addresses bound with set_tensor_address, as a TensorRT engine would.
"""

from __future__ import annotations

import collections
import ctypes
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnxruntime as ort
import pytest
from edgegen.runtime import cudart
from edgegen.runtime.onnx_scan import external_initializers


class HostCuda:
    def __init__(self, compute_capability: str = "8.9"):
        self.calls = collections.Counter()
        self.blocks: dict[int, ctypes.Array] = {}
        self.capturing = None  # the stream being captured
        self.record: list | None = None
        self.streams = [7]  # 7: the process's stream; new_stream adds others
        self.graphs: dict[int, list] = {}
        self.cc = compute_capability
        self.path = "host emulation"

    # memory
    def malloc(self, nbytes: int) -> int:
        self.calls["malloc"] += 1
        buf = ctypes.create_string_buffer(nbytes)
        ptr = ctypes.addressof(buf)
        self.blocks[ptr] = buf
        return ptr

    def free(self, ptr: int) -> None:
        self.blocks.pop(ptr, None)

    TOTAL = 8 << 30  # an 8 GiB "device"

    def memory(self) -> tuple[int, int]:
        """(free, total) bytes, as cudaMemGetInfo: what the emulated mallocs hold is in use."""
        return self.TOTAL - sum(len(b) for b in self.blocks.values()), self.TOTAL

    def pinned(self, shape, dtype) -> np.ndarray:
        self.calls["pinned"] += 1
        return np.zeros(shape, dtype)

    def device(self, nbytes: int):
        return cudart.DeviceBuffer(self, nbytes)

    # streams
    def stream(self) -> int:
        return 7

    def new_stream(self) -> int:
        self.streams.append(self.streams[-1] + 1)
        return self.streams[-1]

    def destroy_stream(self, stream) -> None:
        assert stream in self.streams and stream != 7

    def enqueue(self, op, stream) -> None:
        assert stream in self.streams, f"no such stream {stream}"
        if stream == self.capturing:
            self.record.append(op)
        else:
            op()

    def copy(self, dst, src, nbytes, kind, stream) -> None:
        self.calls[f"copy{kind}"] += 1
        self.enqueue(lambda: ctypes.memmove(dst, src, nbytes), stream)

    def sync(self, stream) -> None:
        assert stream != self.capturing, "synchronising a capturing stream is an error on a GPU"
        self.calls["sync"] += 1

    # graphs
    def begin_capture(self, stream) -> None:
        assert self.capturing is None, "one capture at a time in the emulation"
        self.capturing, self.record = stream, []

    def end_capture(self, stream) -> int:
        assert stream == self.capturing
        self.capturing = None
        exe = len(self.graphs) + 100
        self.graphs[exe] = self.record
        return exe

    def launch(self, exe, stream) -> None:
        self.calls["launch"] += 1
        ops = self.graphs[exe]
        self.enqueue(lambda: [op() for op in ops], stream)

    def destroy_graph(self, exe) -> None:
        self.graphs.pop(exe, None)

    def compute_capability(self, device: int = 0) -> str:
        return self.cc


class FakeRefitter:
    """TensorRT's Refitter over a FakeEngine: the weights set replace the ONNX initializers of that name
    when the engine's session is made again (every external initializer counts as refittable)."""

    def __init__(self, engine, logger):
        self.engine, self.weights = engine, {}

    def get_all_weights(self):
        return list(external_initializers(Path(self.engine.onnx_path).read_bytes()))

    def set_named_weights(self, name, weights):
        self.weights[name] = np.array(weights)  # TensorRT copies at refit; this copies now
        return True

    def refit_cuda_engine(self):
        options = ort.SessionOptions()
        values = [ort.OrtValue.ortvalue_from_numpy(a) for a in self.weights.values()]
        options.add_external_initializers(list(self.weights), values)
        self.engine.session = ort.InferenceSession(
            str(self.engine.onnx_path), options, providers=["CPUExecutionProvider"]
        )
        self.engine.refits += 1
        self.engine.kept = values
        return True


FAKE_TRT = SimpleNamespace(
    __version__="10.3.0.26",
    nptype=lambda dtype: dtype,
    TensorIOMode=SimpleNamespace(INPUT="input", OUTPUT="output"),
    ExecutionContextAllocationStrategy=SimpleNamespace(USER_MANAGED="user-managed"),
    Refitter=FakeRefitter,
    Weights=lambda array: array,
)


class FakeEngine:
    """The TensorRT 10.3 engine API subset TrtGraph uses, executing with ONNX Runtime on the host."""

    def __init__(self, onnx_path, spec, cuda: HostCuda, max_batch: int):
        self.session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        self.onnx_path, self.refits = onnx_path, 0
        self.spec, self.cuda, self.max_batch = spec, cuda, max_batch
        self.io = [*spec.inputs, *spec.outputs]
        self.device_memory_size_v2 = 4096
        self.executions = 0  # the engine's work done (plain runs and graph replays)
        self.enqueues = 0  # execute_async_v3 calls (plain runs and captures)
        self.contexts = 0

    @property
    def num_io_tensors(self):
        return len(self.io)

    def get_tensor_name(self, k):
        return self.io[k].name

    def get_tensor_mode(self, name):
        return "input" if any(t.name == name for t in self.spec.inputs) else "output"

    def get_tensor_dtype(self, name):
        return np.dtype(next(t.dtype for t in self.io if t.name == name).replace("bool", "bool_"))

    def create_execution_context(self, strategy):
        assert strategy == "user-managed"
        self.contexts += 1
        return FakeContext(self)


class FakeContext:
    def __init__(self, engine: FakeEngine):
        self.engine, self.shapes, self.addresses, self.memory = engine, {}, {}, None

    def set_device_memory(self, ptr, size):
        assert size >= self.engine.device_memory_size_v2
        self.memory = ptr

    def set_input_shape(self, name, shape):
        if not 1 <= shape[0] <= self.engine.max_batch:
            return False
        self.shapes[name] = tuple(shape)
        return True

    def get_tensor_shape(self, name):
        if name in self.shapes:
            return self.shapes[name]
        # an output's named axes take the sizes the inputs were given along the same names
        sizes = {
            d: n
            for t in self.engine.spec.inputs
            if t.name in self.shapes
            for d, n in zip(t.shape, self.shapes[t.name])
            if isinstance(d, str)
        }
        t = next(t for t in self.engine.io if t.name == name)
        return tuple(sizes[d] if isinstance(d, str) else d for d in t.shape)

    def set_tensor_address(self, name, ptr):
        self.addresses[name] = ptr
        return True

    def _view(self, t):
        shape = self.get_tensor_shape(t.name)
        dtype = np.dtype(np.bool_ if t.dtype == "bool" else t.dtype)
        nbytes = int(np.prod(shape)) * dtype.itemsize
        raw = (ctypes.c_ubyte * nbytes).from_address(self.addresses[t.name])
        return np.frombuffer(raw, dtype=dtype).reshape(shape)

    def execute_async_v3(self, stream):
        assert self.memory is not None
        self.engine.enqueues += 1

        def op():
            self.engine.executions += 1
            feeds = {t.name: self._view(t).copy() for t in self.engine.spec.inputs}
            outs = self.engine.session.run([t.name for t in self.engine.spec.outputs], feeds)
            for t, value in zip(self.engine.spec.outputs, outs):
                self._view(t)[...] = value

        self.engine.cuda.enqueue(op, stream)
        return True


# The real TensorRT for RTX module where it is installed (its builder runs without a GPU), for the engine
# tests.
def _trt_rtx():
    from edgegen.runtime.engines import import_flavour
    from edgegen.runtime.errors import BackendUnavailableError

    try:
        return import_flavour("trt-rtx")
    except BackendUnavailableError:
        return None


trt = _trt_rtx()
needs_trt_rtx = pytest.mark.skipif(
    trt is None, reason="TensorRT for RTX is not installed (pip install 'edgegen[tensorrt-rtx]')"
)
