"""Jetson / aarch64 readiness: dependency markers per platform, the runtime's import-time dependencies, Jetson
detection in `edgegen doctor` (on a fake board), and (slow, opt-in) the emulated aarch64 comparison."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from edgegen.runtime import jetson
from edgegen.runtime.engines import engine_dir, select_engines
from edgegen.runtime.errors import EngineMismatchError
from packaging.markers import default_environment
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parent.parent
LEAN = {"numpy", "tokenizers", "pillow", "onnxruntime", "onnxruntime-gpu"}
RESULT = REPO / "benchmarks" / "aarch64_result.json"  # what the last emulated run installed


def _pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def _env(
    machine: str, release: str, system: str = "Linux", sys_platform: str = "linux", extra: str = ""
) -> dict:
    env = default_environment()
    env.update(
        platform_machine=machine,
        platform_release=release,
        platform_system=system,
        sys_platform=sys_platform,
        extra=extra,
    )
    return env


PLATFORMS = {
    "x86-64 Linux": _env("x86_64", "6.1.0-18-amd64"),
    "Windows": _env("AMD64", "10", "Windows", "win32"),
    "aarch64 Linux": _env("aarch64", "6.1.0-18-arm64"),
    "Jetson (JetPack 6)": _env("aarch64", "5.15.148-tegra"),
    "Jetson (JetPack 5)": _env("aarch64", "5.10.120-tegra"),
    "macOS arm64": _env("arm64", "23.4.0", "Darwin", "darwin"),
}


def runtime_requirements(env: dict, extra: str = "") -> set[str]:
    """The names `pip install edgegen[extra]` asks for in ``env`` (markers evaluated as pip does)."""
    project = _pyproject()["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    if extra:
        reqs += [Requirement(r) for r in project["optional-dependencies"][extra]]
    env = dict(env, extra=extra)
    return {r.name.lower() for r in reqs if r.marker is None or r.marker.evaluate(env)}


@pytest.mark.parametrize(
    "platform, expected",
    [
        ("x86-64 Linux", {"onnxruntime-gpu"}),
        ("Windows", {"onnxruntime-gpu"}),
        ("aarch64 Linux", {"onnxruntime"}),
        ("macOS arm64", {"onnxruntime"}),
        # a Jetson gets no onnxruntime from PyPI: JetPack's onnxruntime-gpu wheel is installed instead
        ("Jetson (JetPack 6)", set()),
        ("Jetson (JetPack 5)", set()),
    ],
)
def test_onnxruntime_flavour_per_platform(platform, expected):
    assert runtime_requirements(PLATFORMS[platform]) == {"numpy", "tokenizers", "pillow"} | expected


def test_no_platform_gets_onnxruntime_gpu_outside_x86():
    for name, env in PLATFORMS.items():
        if env["platform_machine"] not in ("x86_64", "AMD64"):
            assert "onnxruntime-gpu" not in runtime_requirements(env), name


def test_runtime_dependencies_are_the_lean_set():
    names = {Requirement(r).name.lower() for r in _pyproject()["project"]["dependencies"]}
    assert names == LEAN, (
        f"runtime dependencies changed: {sorted(names ^ LEAN)}; rerun benchmarks/aarch64_check.py"
    )


def test_tensorrt_extra_leaves_jetson_to_jetpack():
    assert "tensorrt" in runtime_requirements(PLATFORMS["x86-64 Linux"], "tensorrt")
    assert "tensorrt" not in runtime_requirements(PLATFORMS["Jetson (JetPack 6)"], "tensorrt")


def test_last_emulated_run_installed_every_aarch64_dependency():
    """The recorded emulated run (benchmarks/aarch64_result.json) found an aarch64 wheel for each runtime
    dependency that pyproject asks for on aarch64 now; a new dependency needs a new run."""
    if not RESULT.exists():
        pytest.skip(
            "no recorded emulated run: sudo python -m benchmarks.aarch64_check --tiny --json "
            "benchmarks/aarch64_result.json"
        )
    recorded = json.loads(RESULT.read_text())
    assert recorded["ok"] and recorded["emulated"]["machine"] == "aarch64"
    missing = runtime_requirements(PLATFORMS["aarch64 Linux"]) - set(recorded["aarch64_packages"])
    assert not missing, f"not in the last emulated aarch64 install: {sorted(missing)}"
    assert not [n for n in recorded["jetson_would_install"] if n.startswith("onnxruntime")]
    jetpack = recorded["jetpack6_py310_wheels"]["runtime"]  # JetPack 6: Python 3.10, glibc 2.35
    assert runtime_requirements(PLATFORMS["Jetson (JetPack 6)"]) <= set(jetpack)
    assert all(f.endswith(("-none-any.whl", "aarch64.whl")) for f in jetpack.values()), jetpack


IMPORTS = r"""
import importlib, pkgutil, sys
def third_party():
    return {m.split(".")[0] for m in sys.modules} - set(sys.stdlib_module_names) - {"__main__", "_distutils_hack"}
for name in ("numpy", "onnxruntime", "tokenizers", "PIL.Image"):
    importlib.import_module(name)
before = third_party()
import edgegen.runtime as rt
for m in pkgutil.walk_packages(rt.__path__, "edgegen.runtime."):
    importlib.import_module(m.name)
print(" ".join(sorted(third_party() - before - {"edgegen"})))
"""  # noqa: E501 (a script run as is: its lines are the string's value)


def test_runtime_imports_nothing_beyond_the_lean_set():
    """Importing every runtime module adds no third-party module beyond numpy, onnxruntime, tokenizers and
    pillow (and what they import themselves): nothing else has to exist on an aarch64 device."""
    done = subprocess.run([sys.executable, "-c", IMPORTS], capture_output=True, text=True, check=True)
    assert done.stdout.split() == [], f"runtime imports more than the lean set: {done.stdout}"


# ---------------------------------------------------------------- Jetson detection (fake board)


def fake_jetson(
    root: Path,
    l4t="# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic, EABI: aarch64, "
    "DATE: Wed Jan  8 01:49:37 UTC 2025\n",
    jetpack="6.2+b77",
    system_trt=True,
) -> Path:
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "nv_tegra_release").write_text(l4t)
    (root / "proc" / "device-tree").mkdir(parents=True)
    (root / "proc" / "device-tree" / "model").write_bytes(b"NVIDIA Jetson AGX Orin Developer Kit\x00")
    (root / "usr" / "local" / "cuda").mkdir(parents=True)
    (root / "usr" / "local" / "cuda" / "version.json").write_text(
        '{"cuda": {"name": "CUDA SDK", "version": "12.6.68"}}'
    )
    status = "Package: python3-libnvinfer\nStatus: install ok installed\nVersion: 10.3.0.30-1+cuda12.5\n"
    if jetpack:
        status += f"\nPackage: nvidia-jetpack\nStatus: install ok installed\nVersion: {jetpack}\n"
    (root / "var" / "lib" / "dpkg").mkdir(parents=True)
    (root / "var" / "lib" / "dpkg" / "status").write_text(status)
    if system_trt:
        (root / "usr" / "lib" / "python3.10" / "dist-packages" / "tensorrt").mkdir(parents=True)
    return root


def test_detect_jetson_reads_the_board(tmp_path):
    info = jetson.detect_jetson(fake_jetson(tmp_path))
    assert info["model"] == "NVIDIA Jetson AGX Orin Developer Kit"
    assert (info["l4t"], info["jetpack"], info["jetpack_from"]) == ("36.4.3", "6.2", "nvidia-jetpack package")
    assert info["cuda"] == "12.6.68" and info["tensorrt_deb"].startswith("10.3")
    assert info["system_tensorrt"] == ["usr/lib/python3.10/dist-packages/tensorrt"]
    assert (
        jetson.describe(info) == "NVIDIA Jetson AGX Orin Developer Kit, L4T 36.4.3, JetPack 6.2, CUDA 12.6.68"
    )


def test_jetpack_from_l4t_when_the_metapackage_is_absent(tmp_path):
    info = jetson.detect_jetson(
        fake_jetson(tmp_path, l4t="# R36 (release), REVISION: 4.0, GCID: 1\n", jetpack=None)
    )
    assert (info["l4t"], info["jetpack"], info["jetpack_from"]) == ("36.4.0", "6.1", "L4T release")


def test_unknown_release_is_reported_not_guessed(tmp_path):
    info = jetson.detect_jetson(fake_jetson(tmp_path, l4t="garbage\n", jetpack=None))
    assert info["l4t"] is None and info["jetpack"] is None
    assert "L4T unknown" in jetson.describe(info)


def test_not_a_jetson(tmp_path):
    assert jetson.detect_jetson(tmp_path) is None
    (tmp_path / "proc" / "device-tree").mkdir(parents=True)
    (tmp_path / "proc" / "device-tree" / "model").write_bytes(b"Raspberry Pi 5 Model B Rev 1.0\x00")
    assert jetson.detect_jetson(tmp_path) is None


def test_l4t_release_forms():
    assert jetson.l4t_release("# R35 (release), REVISION: 4.1, GCID: 33958178") == "35.4.1"
    assert jetson.l4t_release("# R36 (release), REVISION: 3, GCID: 1") == "36.3.0"
    assert jetson.l4t_release(None) is None


def test_jetson_notes_say_what_to_fix(tmp_path):
    info = jetson.detect_jetson(fake_jetson(tmp_path))
    gpu = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert jetson.jetson_notes(info, "1.20.0", gpu, "10.3.0", None) == []
    cpu_only = jetson.jetson_notes(info, "1.23.2", ["CPUExecutionProvider"], "10.3.0", None)
    assert len(cpu_only) == 1 and "CPU-only build" in cpu_only[0] and "onnxruntime-gpu" in cpu_only[0]
    hidden = jetson.jetson_notes(info, "1.20.0", gpu, None, "ModuleNotFoundError: No module named 'tensorrt'")
    assert len(hidden) == 1 and "--system-site-packages" in hidden[0]
    old = jetson.jetson_notes(info, "1.20.0", gpu, "8.6.2", None)
    assert len(old) == 1 and "TensorRT 10" in old[0] and "ort-cuda" in old[0]


def test_doctor_reports_the_jetson(tmp_path, monkeypatch):
    from edgegen.runtime import doctor

    monkeypatch.setattr(
        doctor, "tensorrt_status", lambda: (None, "ModuleNotFoundError: No module named 'tensorrt'")
    )
    report = doctor.run_doctor(None, root=fake_jetson(tmp_path))
    assert report["jetson"]["l4t"] == "36.4.3"
    assert report["versions"]["jetson"].startswith("NVIDIA Jetson AGX Orin")
    assert any("--system-site-packages" in n for n in report["notes"])
    plain = doctor.run_doctor(None, root=tmp_path / "elsewhere")
    assert plain["jetson"] is None and "jetson" not in plain["versions"]


# ---------------------------------------------------------------- engines for Orin (compute capability 8.7)


def test_orin_engines_are_recorded_and_checked_like_any_other():
    assert engine_dir("trt", "10.3.0", "8.7") == "engines/trt-10.3.0-sm87"
    manifest = {
        "engines": [{"flavour": "trt", "version": "10.3.0", "compute_capability": "8.7", "file": "e"}]
    }
    assert select_engines(manifest, "trt", "10.3.0", "8.7", "x") == manifest["engines"]
    with pytest.raises(EngineMismatchError, match="8.7, this GPU is 8.9"):
        select_engines(manifest, "trt", "10.3.0", "8.9", "x")
    with pytest.raises(EngineMismatchError, match="10.3.0, this machine has 10.8.0"):
        select_engines(manifest, "trt", "10.8.0", "8.7", "x")


# ---------------------------------------------------------------- the emulated run itself


def _root_ready() -> bool:
    from benchmarks.aarch64_check import DEFAULT_ROOT, STAMP, VENV

    return (DEFAULT_ROOT / STAMP).exists() and (DEFAULT_ROOT / VENV.lstrip("/") / "bin" / "edgegen").exists()


@pytest.mark.slow
@pytest.mark.skipif(
    not (os.environ.get("EDGEGEN_AARCH64_CHECK") or _root_ready()),
    reason="no cached arm64 root (build it: sudo python -m benchmarks.aarch64_check --tiny), "
    "or set EDGEGEN_AARCH64_CHECK=1",
)
@pytest.mark.skipif(os.geteuid() != 0, reason="chroot needs root")
def test_emulated_aarch64_matches_x86(tmp_path):
    from benchmarks.aarch64_check import main

    out = tmp_path / "result.json"
    assert main(["--tiny", "--offline", "--json", str(out)]) == 0, out.read_text()
    result = json.loads(out.read_text())
    assert result["emulated"]["machine"] == "aarch64"
    for precision in ("fp32", "int8"):
        assert result["bundles"][0]["precisions"][precision]["max_abs_pixel_diff"] <= 1


def test_missing_onnxruntime_says_what_to_install():
    """On a Jetson pip installs no onnxruntime; importing the runtime before JetPack's build is in says so."""
    code = (
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'onnxruntime': raise ImportError('blocked')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import edgegen.runtime\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode != 0
    assert "onnxruntime is not installed" in done.stderr and "docs/jetson.md" in done.stderr
