"""Native TensorRT graphs (backends ``trt`` and ``trt-rtx``): the bundle's prebuilt engines, run on the
process's CUDA stream with device buffers bound by address, and replayed as CUDA graphs.

One code path serves TensorRT 10 (only the 10.3 API that JetPack 6 ships: ``Runtime``,
``deserialize_cuda_engine``, ``create_execution_context(strategy)``, ``set_device_memory``,
``set_input_shape``, ``set_tensor_address``, ``execute_async_v3``) and TensorRT for RTX, which differs only
in how a context is configured (``IRuntimeConfig``: allocation strategy, eager kernel specialisation, a
persisted runtime kernel cache).

Per batch size: one execution context (all contexts share one scratch allocation, safe because every call
is serialised on one stream), pinned host arrays and device buffers, allocated on the first call at that
size. The first call runs the engine plainly; it is then captured into CUDA graphs, and a later call is
one graph launch (input copies, engine, output copies) and one synchronisation: two ctypes calls.

Every graph enqueues on the process's stream, so other threads' pipelines share it: a capture made there
would take in their work. So each graph captures on a private stream (the graph is then launched on the
shared one), and allocations, first runs and captures hold ``cudart.SETUP_LOCK``: ONNX Runtime captures
in global mode, where another thread's cudaMalloc breaks its capture.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from . import cudart
from .backends import backend_spec
from .bundle import NP_DTYPES, Component
from .engines import bundle_key, load_engine, user_cache_dir
from .errors import BackendUnavailableError, BadBundleError, BadInputError, EngineMismatchError


class _BatchSet:
    __slots__ = (
        "context",
        "host_in",
        "host_out",
        "dev",
        "h2d",
        "d2h",
        "graph",
        "graph_io",
        "runs",
        "fed",
        "capture_error",
    )

    def __init__(self):
        self.host_in, self.host_out, self.dev = {}, {}, {}
        self.h2d, self.d2h = [], []
        self.graph, self.graph_io, self.runs, self.fed, self.capture_error, self.context = (
            0,
            0,
            0,
            set(),
            None,
            None,
        )


class TrtGraph:
    """The engine of one component in one form, with the same interface as the ONNX Runtime graphs:
    ``inputs(batch)``, ``outputs(batch)``, ``run(batch)``; plus ``take`` / ``run(fetch=False)`` to keep a
    stage's output on the device for the next stage."""

    kind = "tensorrt"

    def __init__(
        self,
        bundle,
        component: str,
        form: str,
        backend: str,
        spec: Component,
        cuda_graphs: bool = True,
        loaded=None,
        trt=None,
        overrides=None,
    ):
        self.spec, self.backend, self.flavour, self.form = spec, backend, backend, form
        self.cuda = cudart.runtime()  # no GPU: BackendUnavailableError before any engine is read
        self.stream = self.cuda.stream()
        self.engine, self._trt_runtime, self.logger, self.entry = loaded or load_engine(
            bundle, backend, component, form
        )
        self.trt = trt or _module_of(backend)
        self.max_batch = int(self.entry.get("profile", {}).get("max_batch") or bundle.generation["max_batch"])
        self.max_length = bundle.max_length  # the engine's profile fixes the sequence axis there
        self.cuda_graphs = bool(cuda_graphs)
        self.notes: list[str] = []
        self._check_io()
        if overrides is not None:
            self._refit(overrides)
        self._scratch = self.cuda.device(_scratch_size(self.engine))
        self._config, self._cache, self._cache_path = None, None, None
        if backend_spec(backend).engines.runtime_config and hasattr(self.engine, "create_runtime_config"):
            self._config = self._rtx_config(bundle)
        self._sets: dict[int, _BatchSet] = {}
        self._capture_stream = 0  # created at the first capture

    # ------------------------------------------------------------------ setup
    def _check_io(self):
        trt, engine = self.trt, self.engine
        names = {engine.get_tensor_name(k) for k in range(engine.num_io_tensors)}
        wanted = {t.name: t for t in (*self.spec.inputs, *self.spec.outputs)}
        subject = f"engine {self.entry['file']}"
        if names != set(wanted):
            raise BadBundleError(
                subject,
                f"has tensors {sorted(names)}, the manifest says {sorted(wanted)}",
                "rebuild the engines from this bundle's ONNX files",
            )
        for name, t in wanted.items():
            got = np.dtype(trt.nptype(engine.get_tensor_dtype(name)))
            if got != np.dtype(NP_DTYPES[t.dtype]):
                raise BadBundleError(
                    subject,
                    f"{name} is {got}, the manifest says {t.dtype}",
                    "engines must be built strongly typed from the bundle's ONNX "
                    "(edgegen engines BUNDLE --flavour ...)",
                )
            is_input = engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
            if is_input != (t in self.spec.inputs):
                raise BadBundleError(
                    subject,
                    f"{name} is an {'input' if is_input else 'output'} of the engine",
                    "rebuild the engines from this bundle's ONNX files",
                )

    def _refit(self, overrides) -> None:
        """Write LoRA weights merged at load into the engine, before any context exists. Only an engine
        built refittable (``edgegen engines --refittable``) takes them; the names are the ONNX
        initializers' it was built from."""
        subject = f"engine {self.entry['file']}"
        if not self.entry.get("refittable"):
            raise EngineMismatchError(
                subject,
                "was not built refittable: it cannot take a LoRA at load",
                f"rebuild with edgegen engines BUNDLE --flavour {self.flavour} --refittable, "
                "or use an ONNX Runtime backend",
            )
        refitter = self.trt.Refitter(self.engine, self.logger)
        unknown = sorted(set(overrides.arrays) - set(refitter.get_all_weights()))
        if unknown:
            raise BadBundleError(
                subject,
                f"has no refittable weight {unknown[0]!r} ({len(unknown)} missing)",
                "rebuild the engines from this bundle's ONNX files with --refittable",
            )
        # TensorRT reads the arrays during refit_cuda_engine: they stay referenced until it returns
        weights = {name: np.ascontiguousarray(a) for name, a in overrides.arrays.items()}
        for name, array in weights.items():
            if not refitter.set_named_weights(name, self.trt.Weights(array)):
                raise BadBundleError(subject, f"TensorRT refused the weights of {name!r}", "report it")
        if not refitter.refit_cuda_engine():
            raise BadBundleError(subject, f"refit failed: {self.logger.errors()}", "report it")
        self.notes.append(f"refitted {len(weights)} weights (LoRA {overrides.key})")

    def _rtx_config(self, bundle):
        """TensorRT for RTX: user-managed scratch, kernels specialised before the first call returns (so the
        CUDA graph captures the specialised ones), and its JIT kernel cache kept between processes."""
        trt = self.trt
        config = self.engine.create_runtime_config()
        config.set_execution_context_allocation_strategy(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        strategy = getattr(trt, "DynamicShapesKernelSpecializationStrategy", None)
        if strategy is not None:
            config.dynamic_shapes_kernel_specialization_strategy = strategy.EAGER
        try:
            self._cache = config.create_runtime_cache()
            self._cache_path = (
                user_cache_dir()
                / "trt-rtx-runtime-cache"
                / bundle_key(bundle)
                / (Path(self.entry["file"]).name + ".cache")
            )
            if self._cache_path.is_file():
                self._cache.deserialize(self._cache_path.read_bytes())  # False (ignored) if it no longer fits
            config.set_runtime_cache(self._cache)
        except (AttributeError, OSError, TypeError):
            self._cache = None
        return config

    def _context(self):
        trt = self.trt
        if self._config is not None:
            ctx = self.engine.create_execution_context(self._config)
        else:
            ctx = self.engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        if ctx is None:
            raise BackendUnavailableError(
                f"engine {self.entry['file']}",
                "no execution context: " + self.logger.errors(),
                "free GPU memory, or use --backend ort-cuda",
            )
        try:
            ctx.set_device_memory(
                self._scratch.ptr, self._scratch.nbytes
            )  # TensorRT >= 10.1 (setDeviceMemoryV2)
        except (AttributeError, TypeError):  # 10.0 lacks the method (AttributeError) or takes other arguments
            ctx.device_memory = self._scratch.ptr  # the 10.0 form
        return ctx

    def _buffers(self, batch: int) -> _BatchSet:
        found = self._sets.get(batch)
        if found is not None:
            return found
        if not 1 <= batch <= self.max_batch:
            raise BadInputError(
                "batch",
                f"{batch} is outside the engine's profile 1..{self.max_batch}",
                "split the request, or rebuild the engines with a larger --max-batch",
            )
        with cudart.SETUP_LOCK:
            return self._allocate(batch)

    def _allocate(self, batch: int) -> _BatchSet:
        s = _BatchSet()
        s.context = ctx = self._context()
        cuda, subject = self.cuda, f"engine {self.entry['file']}"
        for t in self.spec.inputs:
            shape = t.resolve(batch, self.max_length)
            if not ctx.set_input_shape(t.name, shape):
                raise BadInputError(
                    "batch",
                    f"{t.name} shape {shape} is outside the engine's profile: " + self.logger.errors(),
                    f"batches 1..{self.max_batch}",
                )
        for t in (*self.spec.inputs, *self.spec.outputs):
            shape = t.resolve(batch, self.max_length)
            if tuple(ctx.get_tensor_shape(t.name)) != shape:
                raise BadBundleError(
                    subject,
                    f"{t.name} has shape {tuple(ctx.get_tensor_shape(t.name))} at batch "
                    f"{batch}, the manifest says {shape}",
                    "rebuild the engines from this bundle",
                )
            host = cuda.pinned(shape, NP_DTYPES[t.dtype])
            dev = s.dev[t.name] = cuda.device(host.nbytes)
            if not ctx.set_tensor_address(t.name, dev.ptr):
                raise BackendUnavailableError(
                    subject,
                    f"cannot bind {t.name}: {self.logger.errors()}",
                    "report it with `edgegen doctor --json`",
                )
            if t in self.spec.inputs:
                s.host_in[t.name] = host
                s.h2d.append((t.name, dev.ptr, host.ctypes.data, host.nbytes))
            else:
                s.host_out[t.name] = host
                s.d2h.append((host.ctypes.data, dev.ptr, host.nbytes))
        self._sets[batch] = s
        return s

    # ------------------------------------------------------------------ the graph interface
    dynamic_sequence = False  # engines take one sequence length: the bundle's max_length

    def inputs(self, batch: int, sequence: int | None = None) -> dict[str, np.ndarray]:
        s = self._buffers(batch)
        s.fed.clear()  # the caller is about to write the host arrays: upload them all on the next run
        return s.host_in

    def outputs(self, batch: int, sequence: int | None = None) -> dict[str, np.ndarray]:
        return self._buffers(batch).host_out

    def device_output(self, batch: int, name: str) -> tuple[int, int]:
        """(device pointer, bytes) of an output, valid after ``run(batch)``."""
        s = self._buffers(batch)
        return s.dev[name].ptr, s.dev[name].nbytes

    def take(self, batch: int, name: str, source, source_output: str, sequence: int | None = None) -> None:
        """Feed input ``name`` from ``source``'s device output (a device-to-device copy on the shared stream);
        the host array of that input is not uploaded until the next ``inputs(batch)`` call."""
        s = self._buffers(batch)
        src, nbytes = source.device_output(batch, source_output)
        if nbytes != s.dev[name].nbytes:
            raise BadInputError(
                name,
                f"{source_output} has {nbytes} bytes, {name} needs {s.dev[name].nbytes}",
                "connect tensors of the same shape and dtype",
            )
        self.cuda.copy(s.dev[name].ptr, src, nbytes, cudart.DEVICE_TO_DEVICE, self.stream)
        s.fed.add(name)

    def run(self, batch: int, fetch: bool = True, sequence: int | None = None) -> dict[str, np.ndarray]:
        s = self._sets.get(batch) or self._buffers(batch)
        if s.graph_io and fetch and not s.fed:  # the common call: one launch, one synchronisation
            self.cuda.launch(s.graph_io, self.stream)
            self.cuda.sync(self.stream)
            return s.host_out
        if s.runs == 0:  # the first run and the captures after it: no other thread's setup meanwhile
            with cudart.SETUP_LOCK:
                return self._run_steps(s, batch, fetch)
        return self._run_steps(s, batch, fetch)

    def _run_steps(self, s: _BatchSet, batch: int, fetch: bool) -> dict[str, np.ndarray]:
        """A call as separate steps: copies up (what was not fed on the device), the engine (or its graph),
        copies down."""
        cuda, stream, fed = self.cuda, self.stream, s.fed
        for name, dst, src, nbytes in s.h2d:
            if name not in fed:
                cuda.copy(dst, src, nbytes, cudart.HOST_TO_DEVICE, stream)
        if s.graph:
            cuda.launch(s.graph, stream)
        else:
            if not s.context.execute_async_v3(stream):
                raise BackendUnavailableError(
                    f"engine {self.entry['file']}",
                    "execution failed: " + self.logger.errors(),
                    "run `edgegen doctor`, or use --backend ort-cuda",
                )
            s.runs += 1
        if fetch:
            for dst, src, nbytes in s.d2h:
                cuda.copy(dst, src, nbytes, cudart.DEVICE_TO_HOST, stream)
            cuda.sync(stream)
        if not s.graph and s.runs == 1:
            self._after_first_run(s, batch)
        return s.host_out

    # ------------------------------------------------------------------ CUDA graphs
    def _after_first_run(self, s: _BatchSet, batch: int) -> None:
        """Capture two graphs once the engine has run at this batch size: the engine alone (used when an
        input was fed on the device or outputs stay there) and copies + engine + copies, so a plain call is
        one graph launch and one synchronisation."""
        self.cuda.sync(self.stream)
        self._save_runtime_cache()
        if not self.cuda_graphs:
            return
        capturable = getattr(s.context, "is_stream_capturable", None)
        if capturable is not None and not capturable(self._capture_on()):
            s.capture_error = "the execution context says the stream is not capturable"
        else:
            try:
                s.graph = self._capture(s, with_copies=False)
                s.graph_io = self._capture(s, with_copies=True)
            except BackendUnavailableError as e:
                s.capture_error = str(e)
                if s.graph:  # the engine alone was captured; only the copies run as separate calls
                    self.notes.append(f"{self.entry['file']} batch {batch}: copies not captured ({e})")
                    s.capture_error = None
        if s.capture_error:
            self.notes.append(
                f"{self.entry['file']} batch {batch}: no CUDA graph ({s.capture_error}); "
                "running the engine without one"
            )

    def _capture(self, s: _BatchSet, with_copies: bool) -> int:
        """Capture on this graph's private stream: work other threads enqueue on the shared stream meanwhile
        stays out of the graph (the graph is launched on the shared stream)."""
        cuda, stream = self.cuda, self._capture_on()
        cuda.begin_capture(stream)
        try:
            if with_copies:
                for _, dst, src, nbytes in s.h2d:
                    cuda.copy(
                        dst, src, nbytes, cudart.HOST_TO_DEVICE, stream
                    )  # pinned host memory: capturable
            ok = s.context.execute_async_v3(stream)
            if with_copies:
                for dst, src, nbytes in s.d2h:
                    cuda.copy(dst, src, nbytes, cudart.DEVICE_TO_HOST, stream)
        finally:
            graph = cuda.end_capture(stream)
        if not ok:
            cuda.destroy_graph(graph)
            raise BackendUnavailableError(
                f"engine {self.entry['file']}",
                "enqueue failed while capturing: " + self.logger.errors(),
                "it runs without a CUDA graph",
            )
        return graph

    def _capture_on(self) -> int:
        """This graph's private capture stream, created at its first capture."""
        if not self._capture_stream:
            self._capture_stream = self.cuda.new_stream()
        return self._capture_stream

    def _save_runtime_cache(self) -> None:
        if self._cache is None or self._cache_path is None:
            return
        try:
            data = bytes(self._cache.serialize())
            self._cache_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self._cache_path.with_name(f".{self._cache_path.name}.{os.getpid()}")
            tmp.write_bytes(data)
            tmp.replace(self._cache_path)
        except OSError:
            pass  # a read-only cache directory only costs start-up time

    @property
    def graphs_captured(self) -> list[int]:
        return sorted(b for b, s in self._sets.items() if s.graph)

    def close(self) -> None:
        for s in self._sets.values():
            for exe in (s.graph, s.graph_io):
                self.cuda.destroy_graph(exe)
            s.graph = s.graph_io = 0
            s.context = None
            for buf in s.dev.values():
                buf.free()
        self._sets.clear()
        if getattr(self, "_capture_stream", 0):
            self.cuda.destroy_stream(self._capture_stream)
            self._capture_stream = 0
        self.engine = None
        if getattr(self, "_scratch", None) is not None:
            self._scratch.free()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001  (finalizers must not raise)
            pass


def _module_of(flavour: str):
    from .engines import import_flavour

    return import_flavour(flavour)


def _scratch_size(engine) -> int:
    size = getattr(engine, "device_memory_size_v2", None)  # TensorRT >= 10.1
    return int(size if size is not None else engine.device_memory_size)
