"""The few CUDA runtime calls the GPU backends need, made through ctypes against libcudart.

No torch, no cuda-python: the runtime finds a libcudart (the one ONNX Runtime's CUDA provider or TensorRT
already loaded, else the newest that initialises), and wraps device buffers, page-locked (pinned) host
arrays, one non-blocking stream per process and CUDA graph capture. Nothing here runs at import time.

``runtime()`` returns the process's :class:`Cuda` or raises BackendUnavailableError saying what is missing
(no library, no driver, no GPU). Tests swap in a host emulation with the same methods (``set_runtime``).
"""

from __future__ import annotations

import atexit
import ctypes
import glob
import os
import sys
import threading
from pathlib import Path

import numpy as np

from .errors import BackendUnavailableError

# cudaMemcpyKind
HOST_TO_DEVICE, DEVICE_TO_HOST, DEVICE_TO_DEVICE = 1, 2, 3
STREAM_NON_BLOCKING = 1
CAPTURE_THREAD_LOCAL = (
    1  # cudaStreamCaptureModeThreadLocal: other threads' CUDA calls cannot break our capture
)
ATTR_CC_MAJOR, ATTR_CC_MINOR = 75, 76  # cudaDevAttrComputeCapabilityMajor / Minor
LIB_ENV = "EDGEGEN_CUDART"  # an explicit libcudart path wins over the search
_SHUTTING_DOWN = False
# Held while a GPU graph allocates, runs for the first times at a shape and captures: ONNX Runtime captures
# in global mode, where another thread's cudaMalloc or synchronisation breaks the capture.
SETUP_LOCK = threading.RLock()
CUDART_DLLS = ["cudart64_13.dll", "cudart64_12.dll", "cudart64_110.dll"]
# os.add_dll_directory handles: a directory stays on the search path while its handle lives
_dll_dirs: list = []


@atexit.register
def _at_exit():
    global _SHUTTING_DOWN
    _SHUTTING_DOWN = True  # the CUDA runtime may be torn down before our finalizers run: free nothing then


def _candidates() -> list[str]:
    """libcudart paths to try, most preferred first."""
    found = []
    explicit = os.environ.get(LIB_ENV)
    if explicit:
        return [explicit]
    if sys.platform.startswith("linux"):
        try:  # one already mapped into this process (by ORT's CUDA provider or TensorRT): use that same one
            for line in Path("/proc/self/maps").read_text().splitlines():
                path = line.split()[-1] if len(line.split()) >= 6 else ""
                if "/libcudart.so" in path and path not in found:
                    found.append(path)
        except OSError:
            pass
        names = ["libcudart.so.13", "libcudart.so.12", "libcudart.so.11.0", "libcudart.so"]
        dirs = [
            os.path.join(p, "nvidia", sub, "lib") for p in sys.path if p for sub in ("cu13", "cuda_runtime")
        ]  # pip's nvidia-cuda-runtime wheels
        dirs += [os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), d) for d in ("lib64", "lib")]
        dirs += sorted(glob.glob("/usr/local/cuda-*/lib*"), reverse=True)
        found += names + [
            os.path.join(d, n) for d in dirs for n in names if os.path.exists(os.path.join(d, n))
        ]
    elif sys.platform == "win32":
        found += _windows_candidates()
    return list(dict.fromkeys(found))


def _windows_candidates() -> list[str]:
    """Python >= 3.8 loads DLLs without searching PATH, so look where CUDA puts libcudart: the toolkit's
    bin folder (%CUDA_PATH% and each %CUDA_PATH_Vxx_y%; CUDA 13 uses bin\\x64) and pip's nvidia/*/bin."""
    roots = [os.environ[k] for k in sorted(os.environ) if k == "CUDA_PATH" or k.startswith("CUDA_PATH_V")]
    dirs = [os.path.join(root, *sub) for root in roots for sub in (("bin",), ("bin", "x64"))]
    for entry in sys.path:  # pip's nvidia-cuda-runtime wheels (nvidia/cuda_runtime/bin, nvidia/cu13/bin)
        if entry:
            dirs += sorted(glob.glob(os.path.join(glob.escape(entry), "nvidia", "*", "bin")))
    paths = [os.path.join(d, n) for d in dirs for n in CUDART_DLLS if os.path.isfile(os.path.join(d, n))]
    return paths + CUDART_DLLS  # bare names last: a DLL already loaded, or one in the system folders


def _open_library(path: str) -> ctypes.CDLL:
    """ctypes.CDLL; on Windows a full path's folder is added to the DLL search path first, so the DLLs it
    needs beside it are found too."""
    folder = os.path.dirname(path)
    if sys.platform == "win32" and folder and hasattr(os, "add_dll_directory"):
        try:
            _dll_dirs.append(os.add_dll_directory(folder))
        except OSError:
            pass
    return ctypes.CDLL(path)


class CudaCallError(BackendUnavailableError):
    """A CUDA runtime call failed (``code`` is its cudaError_t)."""

    def __init__(self, call: str, code: int, text: str):
        self.code = code
        super().__init__(
            f"cuda {call}",
            f"failed with error {code} ({text})",
            "run `edgegen doctor` to check the GPU, driver and CUDA libraries",
        )


class _Pinned:
    """Owns one page-locked host allocation; freed when the last array viewing it is gone."""

    def __init__(self, cuda: Cuda, ptr: int):
        self.cuda, self.ptr = cuda, ptr

    def __del__(self):
        if self.ptr and not _SHUTTING_DOWN:
            self.cuda.lib.cudaFreeHost(ctypes.c_void_p(self.ptr))
            self.ptr = 0


class DeviceBuffer:
    """``nbytes`` of device memory at ``ptr``; ``free()`` (or garbage collection) releases it."""

    def __init__(self, cuda: Cuda, nbytes: int):
        self.cuda, self.nbytes = cuda, max(int(nbytes), 1)
        self.ptr = cuda.malloc(self.nbytes)

    def free(self):
        ptr, self.ptr = self.ptr, 0
        if ptr and not _SHUTTING_DOWN:
            self.cuda.free(ptr)

    def __del__(self):
        try:
            self.free()
        except Exception:  # noqa: BLE001  (a finalizer must not raise; the context may already be gone)
            pass


class Cuda:
    """The CUDA runtime through ctypes. Every call raises CudaCallError on failure."""

    def __init__(self, lib: ctypes.CDLL, path: str):
        self.lib, self.path = lib, path
        vp, sz, i, ip = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.POINTER(ctypes.c_int)
        vpp = ctypes.POINTER(ctypes.c_void_p)
        signatures = {
            "cudaGetDeviceCount": [ip],
            "cudaDriverGetVersion": [ip],
            "cudaRuntimeGetVersion": [ip],
            "cudaDeviceGetAttribute": [ip, i, i],
            "cudaSetDevice": [i],
            "cudaGetLastError": [],
            "cudaMalloc": [vpp, sz],
            "cudaFree": [vp],
            "cudaMallocHost": [vpp, sz],
            "cudaFreeHost": [vp],
            "cudaMemcpyAsync": [vp, vp, sz, i, vp],
            "cudaStreamCreateWithFlags": [vpp, ctypes.c_uint],
            "cudaStreamSynchronize": [vp],
            "cudaStreamDestroy": [vp],
            "cudaStreamBeginCapture": [vp, i],
            "cudaStreamEndCapture": [vp, vpp],
            "cudaGraphInstantiateWithFlags": [vpp, vp, ctypes.c_ulonglong],
            "cudaGraphLaunch": [vp, vp],
            "cudaGraphExecDestroy": [vp],
            "cudaGraphDestroy": [vp],
            "cudaMemGetInfo": [ctypes.POINTER(sz)] * 2,
        }
        for name, args in signatures.items():
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = args, ctypes.c_int
        lib.cudaGetErrorString.argtypes, lib.cudaGetErrorString.restype = [ctypes.c_int], ctypes.c_char_p
        # the per-call path binds these once, so a call is one ctypes call and an int compare
        self._memcpy, self._sync, self._launch = (
            lib.cudaMemcpyAsync,
            lib.cudaStreamSynchronize,
            lib.cudaGraphLaunch,
        )
        self._stream = None
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ basics
    def check(self, code: int, call: str) -> None:
        if code != 0:
            text = self.lib.cudaGetErrorString(code)
            self.lib.cudaGetLastError()  # clear a sticky-free error so the next call is not blamed for it
            raise CudaCallError(call, code, text.decode() if text else "unknown")

    def _int(self, call: str, fn, *args) -> int:
        value = ctypes.c_int()
        self.check(fn(ctypes.byref(value), *args), call)
        return value.value

    def device_count(self) -> int:
        return self._int("cudaGetDeviceCount", self.lib.cudaGetDeviceCount)

    def driver_version(self) -> int:
        return self._int("cudaDriverGetVersion", self.lib.cudaDriverGetVersion)

    def runtime_version(self) -> int:
        return self._int("cudaRuntimeGetVersion", self.lib.cudaRuntimeGetVersion)

    def runtime_version_text(self) -> str:
        try:
            v = self.runtime_version()
        except BackendUnavailableError:
            return "?"
        return f"{v // 1000}.{v % 1000 // 10}"

    def compute_capability(self, device: int = 0) -> str:
        major = self._int("cudaDeviceGetAttribute", self.lib.cudaDeviceGetAttribute, ATTR_CC_MAJOR, device)
        minor = self._int("cudaDeviceGetAttribute", self.lib.cudaDeviceGetAttribute, ATTR_CC_MINOR, device)
        return f"{major}.{minor}"

    def memory(self) -> tuple[int, int]:
        free, total = ctypes.c_size_t(), ctypes.c_size_t()
        self.check(self.lib.cudaMemGetInfo(ctypes.byref(free), ctypes.byref(total)), "cudaMemGetInfo")
        return free.value, total.value

    # ------------------------------------------------------------------ memory
    def malloc(self, nbytes: int) -> int:
        ptr = ctypes.c_void_p()
        self.check(self.lib.cudaMalloc(ctypes.byref(ptr), nbytes), f"cudaMalloc({nbytes} bytes)")
        return ptr.value

    def free(self, ptr: int) -> None:
        self.check(self.lib.cudaFree(ptr), "cudaFree")

    def pinned(self, shape: tuple, dtype) -> np.ndarray:
        """A zeroed numpy array in page-locked host memory (fast, truly asynchronous copies)."""
        dtype = np.dtype(dtype)
        count = int(np.prod(shape, dtype=np.int64))
        nbytes = max(count * dtype.itemsize, 1)
        ptr = ctypes.c_void_p()
        self.check(self.lib.cudaMallocHost(ctypes.byref(ptr), nbytes), f"cudaMallocHost({nbytes} bytes)")
        raw = (ctypes.c_ubyte * nbytes).from_address(ptr.value)
        raw.owner = _Pinned(self, ptr.value)  # the array keeps ``raw`` alive, ``raw`` keeps the allocation
        ctypes.memset(ptr.value, 0, nbytes)
        return np.frombuffer(raw, dtype=dtype, count=count).reshape(shape)

    def device(self, nbytes: int) -> DeviceBuffer:
        return DeviceBuffer(self, nbytes)

    # ------------------------------------------------------------------ streams and copies
    def stream(self) -> int:
        """The process's edgegen stream (non-blocking): every GPU graph enqueues on it, so one stage's
        output is ready for the next without a host round trip. Created on first use."""
        with self._lock:
            if self._stream is None:
                self._stream = self.new_stream()
            return self._stream

    def new_stream(self) -> int:
        """Another non-blocking stream (a graph's private capture stream); ``destroy_stream`` ends it."""
        s = ctypes.c_void_p()
        self.check(
            self.lib.cudaStreamCreateWithFlags(ctypes.byref(s), STREAM_NON_BLOCKING),
            "cudaStreamCreateWithFlags",
        )
        return s.value

    def destroy_stream(self, stream: int) -> None:
        if stream and not _SHUTTING_DOWN:
            self.lib.cudaStreamDestroy(stream)

    def copy(self, dst: int, src: int, nbytes: int, kind: int, stream: int) -> None:
        code = self._memcpy(dst, src, nbytes, kind, stream)
        if code:
            self.check(code, "cudaMemcpyAsync")

    def sync(self, stream: int) -> None:
        code = self._sync(stream)
        if code:
            self.check(code, "cudaStreamSynchronize")

    # ------------------------------------------------------------------ CUDA graphs
    def begin_capture(self, stream: int) -> None:
        self.check(self.lib.cudaStreamBeginCapture(stream, CAPTURE_THREAD_LOCAL), "cudaStreamBeginCapture")

    def end_capture(self, stream: int) -> int:
        """Ends the capture and instantiates it; returns the executable graph."""
        graph, exe = ctypes.c_void_p(), ctypes.c_void_p()
        self.check(self.lib.cudaStreamEndCapture(stream, ctypes.byref(graph)), "cudaStreamEndCapture")
        try:
            self.check(
                self.lib.cudaGraphInstantiateWithFlags(ctypes.byref(exe), graph, 0), "cudaGraphInstantiate"
            )
        finally:
            self.lib.cudaGraphDestroy(graph)  # the executable graph does not need it
        return exe.value

    def launch(self, exe: int, stream: int) -> None:
        code = self._launch(exe, stream)
        if code:
            self.check(code, "cudaGraphLaunch")

    def destroy_graph(self, exe: int) -> None:
        if exe and not _SHUTTING_DOWN:
            self.lib.cudaGraphExecDestroy(exe)


_runtime: Cuda | None = None
_failure: BackendUnavailableError | None = None
_probe_lock = threading.Lock()


def _load() -> Cuda:
    tried = []
    for path in _candidates():
        try:
            lib = _open_library(path)
        except OSError:
            continue
        try:
            cuda = Cuda(lib, path)
        except AttributeError as e:  # a libcudart too old for the calls we make (CUDA < 11.4)
            tried.append(f"{path}: {e}")
            continue
        count = ctypes.c_int()
        code = lib.cudaGetDeviceCount(ctypes.byref(count))
        if code == 0 and count.value > 0:
            cuda.check(lib.cudaSetDevice(0), "cudaSetDevice")
            return cuda
        text = lib.cudaGetErrorString(code).decode() if code else "no devices"
        tried.append(f"{Path(path).name.split('.so')[0]} {cuda.runtime_version_text()}: {text}")
    if not tried:
        raise BackendUnavailableError(
            "cuda",
            "no CUDA runtime library (libcudart) found",
            f"install the CUDA runtime (or the GPU build of onnxruntime), or point {LIB_ENV} at libcudart",
        )
    reasons = "; ".join(dict.fromkeys(tried))
    if not _driver_present():
        reasons = f"no NVIDIA driver (libcuda not found; {reasons})"
    raise BackendUnavailableError(
        "cuda",
        f"no usable NVIDIA GPU: {reasons}",
        "a GPU backend needs an NVIDIA GPU with a driver for this CUDA version "
        "(`nvidia-smi` should list it); use --backend ort-cpu",
    )


def _driver_present() -> bool:
    try:
        ctypes.CDLL("nvcuda.dll" if sys.platform == "win32" else "libcuda.so.1")
        return True
    except OSError:
        return False


def runtime() -> Cuda:
    """The process's CUDA runtime; BackendUnavailableError (cached) if there is no usable GPU."""
    global _runtime, _failure
    if _runtime is not None:
        return _runtime
    with _probe_lock:
        if _runtime is None and _failure is None:
            try:
                _runtime = _load()
            except BackendUnavailableError as e:
                _failure = e
        if _failure is not None:
            raise _failure
        return _runtime


def set_runtime(cuda) -> object:
    """Replace the process's CUDA runtime (tests: a host emulation). Returns the previous one."""
    global _runtime, _failure
    previous, _runtime, _failure = _runtime, cuda, None
    return previous


def gpu_status() -> dict:
    """What doctor shows: the library, driver and runtime versions, and each GPU's compute capability;
    ``error`` says why there is none. Never raises."""
    try:
        cuda = runtime()
    except BackendUnavailableError as e:
        return {"available": False, "error": str(e), "libcudart": None}
    info = {"available": True, "error": None, "libcudart": getattr(cuda, "path", None)}
    try:
        fmt = lambda v: f"{v // 1000}.{v % 1000 // 10}"  # noqa: E731  (12040 -> 12.4)
        info["driver_supports_cuda"] = fmt(cuda.driver_version())
        info["cuda_runtime"] = fmt(cuda.runtime_version())
        info["devices"] = [
            {"index": k, "compute_capability": cuda.compute_capability(k), "name": device_name(k)}
            for k in range(cuda.device_count())
        ]
    except BackendUnavailableError as e:
        info["error"] = str(e)
    return info


def device_name(index: int = 0) -> str | None:
    """The GPU's marketing name through the driver API (libcuda), or None."""
    try:
        lib = ctypes.CDLL("nvcuda.dll" if sys.platform == "win32" else "libcuda.so.1")
        name = ctypes.create_string_buffer(256)
        dev = ctypes.c_int()
        if lib.cuInit(0) or lib.cuDeviceGet(ctypes.byref(dev), index) or lib.cuDeviceGetName(name, 256, dev):
            return None
        return name.value.decode(errors="replace")
    except (OSError, AttributeError):
        return None


def compute_capability() -> str | None:
    """The first GPU's compute capability (e.g. '8.9'), or None where there is no usable GPU."""
    try:
        return runtime().compute_capability(0)
    except BackendUnavailableError:
        return None
