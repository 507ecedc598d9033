"""What `edgegen doctor` reports on an NVIDIA Jetson: board, L4T / JetPack release, CUDA, TensorRT and
which ONNX Runtime build is installed, with a note for each thing that is not set up the way
docs/jetson.md describes. Standard library only; every path is read under ``root`` so tests can fake a board.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

GUIDE = "docs/jetson.md"
# L4T (Jetson Linux) release -> JetPack release, from NVIDIA's release notes. TensorRT 10 starts at
# JetPack 6.1.
JETPACK_OF_L4T = {
    "35.1.0": "5.0.2",
    "35.2.1": "5.1",
    "35.3.1": "5.1.1",
    "35.4.1": "5.1.2",
    "35.5.0": "5.1.3",
    "35.6.0": "5.1.4",
    "36.2.0": "6.0 DP",
    "36.3.0": "6.0",
    "36.4.0": "6.1",
    "36.4.3": "6.2",
    "36.4.4": "6.2.1",
}
MIN_TENSORRT_MAJOR = 10  # edgegen's engines are strongly typed TensorRT 10 engines


def _read(root: Path, path: str) -> str | None:
    try:
        return (root / path.lstrip("/")).read_text(errors="replace")
    except OSError:
        return None


def l4t_release(text: str | None) -> str | None:
    """'36.4.3' from /etc/nv_tegra_release ('# R36 (release), REVISION: 4.3, GCID: ...'), else None."""
    match = re.search(r"#\s*R(\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)", text or "")
    if not match:
        return None
    parts = f"{match.group(1)}.{match.group(2)}".split(".")
    return ".".join((parts + ["0"])[:3])


def _dpkg_version(status: str | None, package: str) -> str | None:
    """The version of an installed Debian package, read from /var/lib/dpkg/status."""
    for block in (status or "").split("\n\n"):
        if (
            re.search(rf"^Package: {re.escape(package)}$", block, re.M)
            and "Status: install ok installed" in block
        ):
            found = re.search(r"^Version: (\S+)", block, re.M)
            if found:
                return found.group(1)
    return None


def _cuda_version(root: Path) -> str | None:
    text = _read(root, "/usr/local/cuda/version.json")
    found = re.search(r'"cuda"\s*:\s*\{[^}]*"version"\s*:\s*"([^"]+)"', text or "")
    if found:
        return found.group(1)
    found = re.search(r"CUDA Version ([\d.]+)", _read(root, "/usr/local/cuda/version.txt") or "")
    return found.group(1) if found else None


def detect_jetson(root: str | Path = "/") -> dict | None:
    """Facts about this Jetson, or None if this is not one (no /etc/nv_tegra_release, no Jetson device
    tree)."""
    root = Path(root)
    release_text = _read(root, "/etc/nv_tegra_release")
    model = (_read(root, "/proc/device-tree/model") or "").replace("\x00", "").strip()
    if release_text is None and "jetson" not in model.lower() and "tegra" not in model.lower():
        return None
    l4t = l4t_release(release_text)
    status = _read(root, "/var/lib/dpkg/status")
    jetpack = _dpkg_version(status, "nvidia-jetpack")
    return {
        "model": model or None,
        "l4t": l4t,
        "jetpack": jetpack.split("+")[0] if jetpack else JETPACK_OF_L4T.get(l4t or ""),
        "jetpack_from": "nvidia-jetpack package"
        if jetpack
        else "L4T release"
        if l4t in JETPACK_OF_L4T
        else None,
        "cuda": _cuda_version(root),
        "tensorrt_deb": _dpkg_version(status, "python3-libnvinfer"),
        "system_tensorrt": sorted(
            str(p.relative_to(root)) for p in root.glob("usr/lib/python3*/dist-packages/tensorrt")
        ),
    }


def tensorrt_status() -> tuple[str | None, str | None]:
    """(version, None) if `import tensorrt` works in this Python, else (None, why)."""
    try:
        return importlib.import_module("tensorrt").__version__, None
    except Exception as e:  # ImportError, or a binding whose libraries fail to load
        return None, f"{type(e).__name__}: {e}"


def jetson_notes(
    info: dict, ort_version: str, ort_providers: list[str], trt_version: str | None, trt_error: str | None
) -> list[str]:
    """What a Jetson owner should fix, one line each (empty when it is set up as the guide says)."""
    notes = []
    if "CUDAExecutionProvider" not in ort_providers:
        notes.append(
            f"onnxruntime {ort_version} is a CPU-only build (PyPI's aarch64 wheel): for ort-cuda / ort-trt "
            f"`pip uninstall onnxruntime` and install JetPack's onnxruntime-gpu wheel (see {GUIDE})"
        )
    if trt_version is None:
        if info.get("system_tensorrt"):
            notes.append(
                f"TensorRT is installed for the system Python ({info['system_tensorrt'][0]}) but this Python "
                "cannot import it: create the virtual environment with --system-site-packages"
            )
        else:
            notes.append(
                f"TensorRT's Python module is not importable ({trt_error}): "
                "`sudo apt install nvidia-jetpack` (or python3-libnvinfer) and use --system-site-packages"
            )
    elif int(trt_version.split(".")[0]) < MIN_TENSORRT_MAJOR:
        notes.append(
            f"TensorRT {trt_version}: edgegen's trt engines need TensorRT {MIN_TENSORRT_MAJOR} "
            "(JetPack 6.1 or later); use --backend ort-cuda on this JetPack"
        )
    return notes


def describe(info: dict) -> str:
    """One line for doctor's table: 'NVIDIA Jetson AGX Orin ..., L4T 36.4.3, JetPack 6.2, CUDA 12.6'."""
    parts = [info.get("model") or "Jetson (model unknown)"]
    parts.append(f"L4T {info['l4t']}" if info.get("l4t") else "L4T unknown")
    if info.get("jetpack"):
        parts.append(f"JetPack {info['jetpack']}")
    if info.get("cuda"):
        parts.append(f"CUDA {info['cuda']}")
    return ", ".join(parts)
