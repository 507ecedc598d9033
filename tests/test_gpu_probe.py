"""What the GPU backends find out about a machine before any engine runs, checked without a GPU by faking
the machine: TensorRT-RTX targets (Hopper is none), TensorRT's version, libnvinfer's name, libcudart on
Windows."""

import ctypes
import os
import sys
from types import SimpleNamespace

import pytest
from edgegen.runtime import BackendUnavailableError, backends, cudart, engines, ort_gpu
from gpu_emulation import HostCuda
from gpu_emulation import trt as real_trt_rtx

FAKE_RTX = SimpleNamespace(
    __version__="1.7.1.116",
    ComputeCapability=SimpleNamespace(SM75=75, SM80=80, SM86=86, SM89=89, SM120=120, SM121=121),
)


@pytest.fixture
def machine_with(monkeypatch):
    """machine_with(compute_capability, module): this process sees that GPU and that TensorRT module."""
    previous = []

    def setup(cc, module):
        previous.append(cudart.set_runtime(HostCuda(cc)))
        monkeypatch.setattr(engines, "import_flavour", lambda flavour: module)
        backends.backend_loads.cache_clear()

    yield setup
    if previous:
        cudart.set_runtime(previous[0])
    backends.backend_loads.cache_clear()


def test_trt_rtx_does_not_load_on_a_gpu_it_does_not_target(machine_with):
    machine_with("9.0", FAKE_RTX)  # an H100 / H200
    ok, why = backends.backend_loads("trt-rtx")
    assert not ok and why == (
        "this GPU (compute capability 9.0) is not a target of TensorRT for RTX 1.7.1.116 "
        "(targets: 7.5, 8.0, 8.6, 8.9, 12.0, 12.1)"
    )


def test_trt_rtx_loads_on_a_gpu_it_targets(machine_with):
    machine_with("8.9", FAKE_RTX)
    assert backends.backend_loads("trt-rtx") == (True, "")
    assert engines.machine("trt-rtx") == (FAKE_RTX, "1.7.1.116", "8.9")


@pytest.mark.skipif(real_trt_rtx is None, reason="TensorRT for RTX is not installed")
def test_the_installed_trt_rtx_does_not_target_hopper():
    targets = engines.capability_targets(real_trt_rtx)
    assert "8.9" in targets and "9.0" not in targets


def test_tensorrt_older_than_10_is_refused_by_name(machine_with):
    machine_with("8.7", SimpleNamespace(__version__="8.6.2.3"))  # JetPack 6.0
    ok, why = backends.backend_loads("trt")
    assert (
        not ok
        and why
        == "TensorRT 8.6.2.3 is too old: edgegen's engines need TensorRT >= 10 (strongly typed networks)"
    )
    machine_with("8.7", SimpleNamespace(__version__="10.3.0.30"))
    assert backends.backend_loads("trt") == (True, "")


def test_tensorrt_version_finds_libnvinfer_11(monkeypatch):
    """PyPI's tensorrt>=10 installs 11.x: libnvinfer.so.11 is found and its version read."""
    opened = []

    class Lib:
        def __init__(self, name):
            opened.append(name)
            if name != "libnvinfer.so.11":
                raise OSError(f"{name}: cannot open shared object file")
            self.getInferLibVersion = lambda: 110003

    monkeypatch.setattr(ort_gpu.os, "name", "posix")
    monkeypatch.setattr(ort_gpu.ctypes, "CDLL", Lib)
    monkeypatch.setattr(ort_gpu.Path, "read_text", lambda self, *a, **k: "")  # nothing mapped yet
    assert ort_gpu.tensorrt_version() == "11.0.3"
    assert opened == ["libnvinfer.so.11"]
    monkeypatch.setattr(ort_gpu, "NVINFER_LIBS", {"posix": ["libnvinfer.so.10"], "nt": []})
    assert ort_gpu.tensorrt_version() is None


@pytest.fixture
def windows(monkeypatch, tmp_path):
    """A Windows machine: CUDA 13 in %CUDA_PATH%\\bin\\x64, CUDA 12 from pip's nvidia-cuda-runtime wheel."""
    toolkit = tmp_path / "CUDA" / "v13.0"
    (toolkit / "bin" / "x64").mkdir(parents=True)
    (toolkit / "bin" / "x64" / "cudart64_13.dll").write_bytes(b"")
    site = tmp_path / "site-packages"
    (site / "nvidia" / "cuda_runtime" / "bin").mkdir(parents=True)
    (site / "nvidia" / "cuda_runtime" / "bin" / "cudart64_12.dll").write_bytes(b"")
    monkeypatch.setattr(sys, "platform", "win32")
    monkeypatch.delenv(cudart.LIB_ENV, raising=False)
    for key in [k for k in os.environ if k.startswith("CUDA_PATH")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("CUDA_PATH", str(toolkit))
    monkeypatch.setattr(sys, "path", ["", str(site)])
    return toolkit, site


def test_libcudart_on_windows_is_looked_for_in_cuda_path_and_pip_folders(windows):
    toolkit, site = windows
    assert cudart._candidates() == [
        str(toolkit / "bin" / "x64" / "cudart64_13.dll"),
        str(site / "nvidia" / "cuda_runtime" / "bin" / "cudart64_12.dll"),
        "cudart64_13.dll",
        "cudart64_12.dll",
        "cudart64_110.dll",
    ]


def test_libcudart_on_windows_is_opened_with_its_folder_on_the_dll_path(windows, monkeypatch):
    toolkit, site = windows
    added, opened = [], []

    def cdll(path):
        opened.append(path)
        raise OSError("not a real DLL")

    monkeypatch.setattr(os, "add_dll_directory", lambda folder: added.append(folder) or folder, raising=False)
    monkeypatch.setattr(ctypes, "CDLL", cdll)
    monkeypatch.setattr(cudart, "_dll_dirs", [])
    with pytest.raises(BackendUnavailableError, match="no CUDA runtime library"):
        cudart._load()
    assert opened[:2] == [
        str(toolkit / "bin" / "x64" / "cudart64_13.dll"),
        str(site / "nvidia" / "cuda_runtime" / "bin" / "cudart64_12.dll"),
    ]
    assert added == [str(toolkit / "bin" / "x64"), str(site / "nvidia" / "cuda_runtime" / "bin")]
