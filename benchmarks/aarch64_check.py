"""The lean runtime on aarch64, proven under emulation (qemu-user) without a Jetson.

    sudo python -m benchmarks.aarch64_check --tiny            # a tiny random-weight bundle, exported here
    sudo python -m benchmarks.aarch64_check --default         # the shipped default model (emoji64)
    sudo python -m benchmarks.aarch64_check BUNDLE [BUNDLE...] --json result.json

What it does, on an x86-64 Debian/Ubuntu host as root (chroot needs it):
1. registers qemu-aarch64 with binfmt_misc (apt packages qemu-user-static, binfmt-support, debootstrap);
2. builds an arm64 Debian 12 root with debootstrap once, cached in ~/.cache/edgegen-arm64/rootfs
   (EDGEGEN_ARM64_ROOT), and a virtual environment /opt/edgegen in it, made as docs/jetson.md makes it;
3. builds edgegen's wheel here and installs it there from PyPI's aarch64 wheels only (--only-binary=:all:),
   without the export extra, and checks that no torch/transformers/onnx got in;
4. asks pip there, with qemu reporting a Jetson kernel (QEMU_UNAME=...-tegra), what `pip install edgegen`
   would install on a Jetson: no onnxruntime of any kind; and asks pip here which wheels JetPack 6's
   Python 3.10 / glibc 2.35 would get (runtime, and the export extra);
5. generates the same prompts and seeds on ort-cpu here (x86) and there (aarch64), fp32 and int8, and
   compares the pixels (they must agree within 1 uint8 level);
6. runs `edgegen doctor --bundle B --json` there, as plain aarch64 and with a fake /etc/nv_tegra_release
   (what a Jetson owner sees before installing JetPack's onnxruntime-gpu);
7. runs the board-independent commands of docs/jetson.md there (doctor, inspect, validate, generate, bench).

Exit 0 if every check passes. The first run downloads ~200 MB; later runs reuse the root and pip's cache
there. Run times and results: benchmarks/RESULTS.md, section "Jetson / aarch64".
`python benchmarks/aarch64_check.py images ...` is the part that runs inside the root (lean runtime only).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_ROOT = Path(
    os.environ.get("EDGEGEN_ARM64_ROOT") or Path.home() / ".cache" / "edgegen-arm64" / "rootfs"
)
SUITE, MIRROR = "bookworm", os.environ.get("EDGEGEN_DEBIAN_MIRROR", "http://deb.debian.org/debian")
VENV = "/opt/edgegen"  # inside the root
WORK = "/tmp/edgegen-check"  # inside the root: wheel, bundles, outputs
STAMP = ".edgegen-root-ready"
HOST_CA = "/etc/ssl/certs/edgegen-host-ca.crt"  # inside the root: a copy of the host's CA bundle
TEGRA_KERNEL = "5.15.148-tegra"  # a JetPack 6 kernel release, as `uname -r` prints it on an Orin
FAKE_TEGRA_RELEASE = (
    "# R36 (release), REVISION: 4.3, GCID: 00000000, BOARD: generic, EABI: aarch64, DATE: emulated\n"
)
PROMPTS = [
    "a rocket on a blue background",
    "a smiling cat face",
    "a red apple on a green background",
    "a tiny yellow star",
    "a big dark moon",
]
SEEDS = [3, 7, 11, 19, 23]
PRECISIONS = ("fp32", "int8")
PIXEL_TOLERANCE = 1
COMMAND_TIMEOUT_S = 1800  # per guide command; emulation is slow
FORBIDDEN = ("torch", "transformers", "diffusers", "onnx", "onnxscript", "onnxruntime-gpu")


class CheckFailed(Exception):
    pass


# ---------------------------------------------------------------- inside the root (lean runtime only)


def generate_images(bundle: str, precisions, out: str) -> None:
    """Generate PROMPTS x SEEDS on ort-cpu for each precision (one batch, then one prompt alone)
    into ``out``."""
    import numpy as np
    from edgegen.runtime import Pipeline

    arrays, timing = {}, {}
    for precision in precisions:
        pipe = Pipeline.from_bundle(bundle, backend="ort-cpu", precision=precision)
        start = time.perf_counter()
        arrays[f"{precision}.batch"] = pipe(PROMPTS, seed=SEEDS, output_type="uint8")
        arrays[f"{precision}.single"] = pipe(PROMPTS[0], seed=SEEDS[0], output_type="uint8")
        timing[precision] = round(time.perf_counter() - start, 3)
    np.savez(out, **arrays)
    print(json.dumps({"machine": platform.machine(), "seconds": timing}))


# ---------------------------------------------------------------- on the host


def run(cmd, check_rc: bool = True, **kw) -> subprocess.CompletedProcess:
    print("+ " + " ".join(str(c) for c in cmd), file=sys.stderr, flush=True)
    return subprocess.run([str(c) for c in cmd], check=check_rc, **kw)


def ensure_binfmt() -> None:
    """qemu-aarch64 registered with binfmt_misc, so the root's arm64 programs run (and can start others)."""
    entry = Path("/proc/sys/fs/binfmt_misc/qemu-aarch64")
    if entry.exists() and entry.read_text().startswith("enabled"):
        return
    missing = [
        tool for tool in ("debootstrap", "qemu-aarch64-static", "update-binfmts") if not shutil.which(tool)
    ]
    if missing:
        raise CheckFailed(
            f"host | missing {', '.join(missing)}. Note: "
            "apt-get install -y debootstrap qemu-user-static binfmt-support"
        )
    if not Path("/proc/sys/fs/binfmt_misc/register").exists():  # containers often lack the mount
        subprocess.run(["mount", "-t", "binfmt_misc", "binfmt_misc", "/proc/sys/fs/binfmt_misc"], check=False)
    subprocess.run(["update-binfmts", "--enable", "qemu-aarch64"], check=False)
    if not (entry.exists() and entry.read_text().startswith("enabled")):
        raise CheckFailed(
            "host | qemu-aarch64 is not registered with binfmt_misc. Note: run as root where "
            "binfmt_misc can be mounted (docker: --privileged), or on a host with qemu-user-static"
        )


def share_network(root: Path) -> None:
    """The host's DNS settings and trusted certificates (a TLS-inspecting proxy's CA included) for pip
    there."""
    shutil.copy("/etc/resolv.conf", root / "etc" / "resolv.conf")
    host_ca = Path(os.environ.get("SSL_CERT_FILE") or "/etc/ssl/certs/ca-certificates.crt")
    if host_ca.is_file():
        shutil.copy(host_ca, root / HOST_CA.lstrip("/"))


def chroot(root: Path, *cmd, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    """Run ``cmd`` inside the root with a clean environment (the host's pip settings stay out)."""
    base = {
        "PATH": f"{VENV}/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": "/root",
        "LANG": "C.UTF-8",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
    }
    if (root / HOST_CA.lstrip("/")).is_file():
        base["PIP_CERT"] = HOST_CA
    base.update(env or {})
    return run(["chroot", root, "/usr/bin/env", "-i", *(f"{k}={v}" for k, v in base.items()), *cmd], **kw)


class Mounts:
    """/proc inside the root while it is used (ONNX Runtime reads the CPU list from it)."""

    def __init__(self, root: Path):
        self.proc = root / "proc"

    def __enter__(self):
        if not os.path.ismount(self.proc):
            run(["mount", "-t", "proc", "proc", self.proc])
        return self

    def __exit__(self, *exc):
        if os.path.ismount(self.proc):
            subprocess.run(["umount", "-l", str(self.proc)], check=False)


def ensure_root(root: Path) -> float:
    """Build the arm64 root once; returns the seconds spent (0 when cached)."""
    if (root / STAMP).exists():
        return 0.0
    start = time.perf_counter()
    if root.exists():
        shutil.rmtree(root)  # a half-built root from an interrupted run
    root.parent.mkdir(parents=True, exist_ok=True)
    run(
        [
            "debootstrap",
            "--arch=arm64",
            "--variant=minbase",
            "--include=python3,python3-venv,ca-certificates",
            SUITE,
            root,
            MIRROR,
        ]
    )
    (root / STAMP).write_text(f"{SUITE} {MIRROR}\n")
    return time.perf_counter() - start


def ensure_venv(root: Path) -> None:
    """The virtual environment edgegen goes into, made as docs/jetson.md makes it (--system-site-packages,
    so JetPack's TensorRT would be visible on a board)."""
    if (root / VENV.lstrip("/") / "bin" / "python").exists():
        return
    chroot(root, "/usr/bin/python3", "-m", "venv", "--system-site-packages", VENV)
    chroot(root, f"{VENV}/bin/python", "-m", "pip", "install", "-q", "--upgrade", "pip")


def build_wheel(out: Path) -> Path:
    """edgegen's pure-Python wheel (no native host path: the same file installs on every platform, as
    docs/jetson.md builds it), built from a copy of the tree's packaging files so no build/ directory lands in
    the repository."""
    src = out / "src"
    src.mkdir(parents=True)
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(REPO / name, src / name)
    for name in ("runtime", "export"):
        shutil.copytree(
            REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "emoji64", "*.so", "*.pyd")
        )
    run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", out, src],
        env={**os.environ, "EDGEGEN_PURE_PYTHON": "1"},
    )
    return next(out.glob("edgegen-*.whl"))


def install_runtime(root: Path, wheel: Path, offline: bool = False) -> dict:
    """Install the wheel (runtime only) from PyPI's aarch64 wheels; returns {package: version} there.
    ``offline``: only replace edgegen itself (its dependencies are there from an earlier run)."""
    work = root / WORK.lstrip("/")
    shutil.copy(wheel, work / wheel.name)
    inside = f"{WORK}/{wheel.name}"
    pip = [f"{VENV}/bin/python", "-m", "pip"]
    if not offline:
        chroot(root, *pip, "install", "-q", "--only-binary=:all:", inside)
    chroot(
        root, *pip, "install", "-q", "--no-index", "--force-reinstall", "--no-deps", inside
    )  # this tree's code
    chroot(root, *pip, "check")
    listed = chroot(root, *pip, "list", "--format=json", capture_output=True, text=True).stdout
    packages = {p["name"].lower(): p["version"] for p in json.loads(listed)}
    leaked = [name for name in FORBIDDEN if name in packages]
    if leaked:
        raise CheckFailed(
            f"aarch64 install | pulled in {', '.join(leaked)}. Note: the runtime must stay lean"
        )
    return packages


def jetson_resolution(root: Path, wheel: Path) -> list[str]:
    """What pip would install for edgegen on a Jetson kernel (qemu reports a -tegra release): names only."""
    report = f"{WORK}/jetson-report.json"
    chroot(
        root,
        f"{VENV}/bin/python",
        "-m",
        "pip",
        "install",
        "-q",
        "--dry-run",
        "--ignore-installed",
        "--only-binary=:all:",
        "--report",
        report,
        f"{WORK}/{wheel.name}",
        env={"QEMU_UNAME": TEGRA_KERNEL},
    )
    data = json.loads((root / report.lstrip("/")).read_text())
    names = sorted(item["metadata"]["name"].lower() for item in data["install"])
    onnx = [n for n in names if n.startswith("onnxruntime")]
    if onnx:
        raise CheckFailed(
            f"Jetson install | pip would install {', '.join(onnx)} from PyPI. Note: on a Jetson "
            "JetPack's onnxruntime-gpu is the one to use (pyproject markers)"
        )
    return names


def requirements_for(env: dict, extra: str = "") -> list[str]:
    """pyproject's requirements (and an extra's) whose markers hold in ``env``, markers stripped."""
    import tomllib
    from packaging.markers import default_environment
    from packaging.requirements import Requirement

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    lines = project["dependencies"] + (project["optional-dependencies"][extra] if extra else [])
    env = {**default_environment(), **env, "extra": extra}
    reqs = [Requirement(line) for line in lines]
    return [f"{r.name}{r.specifier}" for r in reqs if r.marker is None or r.marker.evaluate(env)]


def jetpack6_wheels(extra: str = "") -> dict:
    """What pip would download for a JetPack 6 board (Python 3.10, glibc 2.35, aarch64), binary wheels only:
    {name: wheel file}. pip evaluates markers for the host, so they are evaluated here for a Jetson first."""
    reqs = requirements_for(
        {
            "platform_machine": "aarch64",
            "platform_release": TEGRA_KERNEL,
            "python_version": "3.10",
            "python_full_version": "3.10.12",
        },
        extra,
    )
    platforms = ["manylinux2014_aarch64", *(f"manylinux_2_{minor}_aarch64" for minor in range(17, 36))]
    with tempfile.TemporaryDirectory() as tmp:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
        env["PIP_CONFIG_FILE"] = os.devnull  # PyPI alone, not this machine's local wheel folders
        run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "-q",
                "--dry-run",
                "--ignore-installed",
                "--only-binary=:all:",
                "--python-version",
                "3.10",
                *(f"--platform={p}" for p in platforms),
                "--target",
                f"{tmp}/t",
                "--report",
                f"{tmp}/report.json",
                *reqs,
            ],
            env=env,
        )
        data = json.loads(Path(f"{tmp}/report.json").read_text())
    return {
        i["metadata"]["name"].lower(): i["download_info"]["url"].rsplit("/", 1)[1] for i in data["install"]
    }


def compare(host: dict, emulated: dict) -> dict:
    """Per precision: the largest pixel difference and how many pixels differ at all."""
    import numpy as np

    result = {}
    for precision in PRECISIONS:
        keys = [k for k in host if k.startswith(precision + ".")]
        worst, differing, total = 0, 0, 0
        for key in keys:
            a, b = host[key].astype(np.int16), emulated[key].astype(np.int16)
            if a.shape != b.shape:
                raise CheckFailed(f"{key} | shapes differ: {a.shape} here, {b.shape} on aarch64")
            diff = np.abs(a - b)
            worst, differing, total = (
                max(worst, int(diff.max())),
                differing + int((diff > 0).sum()),
                total + diff.size,
            )
        result[precision] = {
            "max_abs_pixel_diff": worst,
            "pixels_differing": differing,
            "pixels": total,
            "ok": worst <= PIXEL_TOLERANCE,
        }
    return result


def check_bundle(root: Path, bundle: Path, index: int) -> dict:
    import numpy as np

    name = f"b{index}"
    inside = f"{WORK}/bundles/{name}"
    target = root / inside.lstrip("/")
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(bundle, target, symlinks=False)
    entry = {"bundle": str(bundle)}
    # x86 reference, with this interpreter's runtime
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        generate_images(str(bundle), PRECISIONS, f"{tmp}/host.npz")
        entry["host_seconds"] = round(time.perf_counter() - start, 1)
        with np.load(f"{tmp}/host.npz") as data:
            host = {k: data[k] for k in data.files}
    start = time.perf_counter()
    out = f"{WORK}/{name}.npz"
    shutil.copy(Path(__file__), root / WORK.lstrip("/") / "aarch64_check.py")
    chroot(root, f"{VENV}/bin/python", f"{WORK}/aarch64_check.py", "images", inside, "--out", out)
    entry["emulated_seconds"] = round(time.perf_counter() - start, 1)
    with np.load(root / out.lstrip("/")) as data:
        emulated = {k: data[k] for k in data.files}
    entry["precisions"] = compare(host, emulated)
    # doctor, as plain aarch64 and as a Jetson (fake release file) whose onnxruntime is PyPI's CPU build
    start = time.perf_counter()
    entry["doctor"] = _doctor(root, inside)
    release = root / "etc" / "nv_tegra_release"
    try:
        release.write_text(FAKE_TEGRA_RELEASE)
        jetson = _doctor(root, inside)
    finally:
        release.unlink(missing_ok=True)
    entry["doctor_as_jetson"] = {"ok": jetson["ok"], "jetson": jetson.get("jetson"), "notes": jetson["notes"]}
    entry["doctor_seconds"] = round(time.perf_counter() - start, 1)
    entry["commands"] = guide_commands(root, inside)
    entry["ok"] = (
        all(p["ok"] for p in entry["precisions"].values())
        and entry["doctor"]["ok"]
        and jetson.get("jetson") is not None
        and all(c["rc"] == 0 for c in entry["commands"])
    )
    return entry


def guide_commands(root: Path, bundle: str) -> list[dict]:
    """The docs/jetson.md commands that need no board, run on aarch64 as written there (ort-cpu where the
    guide names a GPU backend): exit status, seconds and the end of the output, each."""
    commands = [
        ["python", "-c", "import onnxruntime as ort; print(ort.__version__, ort.get_available_providers())"],
        ["edgegen", "doctor"],
        ["edgegen", "doctor", "--json"],
        ["edgegen", "inspect", bundle],
        ["edgegen", "validate", bundle, "--backend", "ort-cpu"],
        [
            "edgegen",
            "generate",
            "a rocket on a blue background",
            "--bundle",
            bundle,
            "--seed",
            "3",
            "-o",
            f"{WORK}/rocket.png",
        ],
        ["edgegen", "bench", bundle, "--backend", "ort-cpu", "--precision", "int8"],
        ["edgegen", "bench", bundle, "--backend", "ort-cpu", "--precision", "fp32", "--json"],
        ["edgegen", "bench", bundle, "--batch", "4", "--seconds", "20"],
    ]
    done = []
    for cmd in commands:
        start = time.perf_counter()
        try:
            out = chroot(
                root, *cmd, capture_output=True, text=True, check_rc=False, timeout=COMMAND_TIMEOUT_S
            )
            rc, tail = out.returncode, (out.stdout if out.returncode == 0 else out.stdout + out.stderr)[-700:]
        except subprocess.TimeoutExpired:
            rc, tail = None, f"timed out after {COMMAND_TIMEOUT_S} s"
        done.append(
            {
                "command": " ".join(cmd),
                "rc": rc,
                "seconds": round(time.perf_counter() - start, 1),
                "output_tail": tail,
            }
        )
    return done


def _doctor(root: Path, bundle: str) -> dict:
    done = chroot(
        root, f"{VENV}/bin/edgegen", "doctor", "--bundle", bundle, "--json", capture_output=True, text=True
    )
    report = json.loads(done.stdout)
    return {k: report[k] for k in ("ok", "versions", "backends", "notes", "jetson") if k in report}


def tiny_bundle(directory: Path) -> Path:
    from edgegen.export import export_checkpoint
    from edgegen.export.testing import make_tiny_checkpoint

    checkpoint = make_tiny_checkpoint(directory / "checkpoint")
    return export_checkpoint(checkpoint, directory / "bundle", precisions="fp32,int8", progress=False)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "images":  # inside the root
        p = argparse.ArgumentParser(prog="aarch64_check.py images")
        p.add_argument("bundle")
        p.add_argument("--out", required=True)
        a = p.parse_args(argv[1:])
        generate_images(a.bundle, PRECISIONS, a.out)
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "bundles", nargs="*", type=Path, help="bundles exported on this machine (need fp32 and int8)"
    )
    p.add_argument("--tiny", action="store_true", help="also check a tiny random-weight bundle exported now")
    p.add_argument("--default", action="store_true", help="also check the shipped default model (emoji64)")
    p.add_argument("--root", type=Path, default=DEFAULT_ROOT, help=f"arm64 root (default {DEFAULT_ROOT})")
    p.add_argument("--json", type=Path, help="write the result here too")
    p.add_argument(
        "--offline",
        action="store_true",
        help="no network: reuse the root's installed dependencies, "
        "replace edgegen only, skip the pip resolution checks (what the slow test runs)",
    )
    a = p.parse_args(argv)
    from edgegen.runtime.errors import EdgegenError  # the host side has edgegen (the root gets it later)

    start = time.perf_counter()
    result = {"host": {"machine": platform.machine(), "python": platform.python_version()}, "bundles": []}
    try:
        with tempfile.TemporaryDirectory(prefix="edgegen-aarch64-") as tmp:
            bundles = list(a.bundles)
            if a.tiny:
                bundles.append(tiny_bundle(Path(tmp)))
            if a.default:
                from edgegen.export import default_bundle

                bundles.append(default_bundle())
            if not bundles:
                p.error("give a bundle, --tiny or --default")
            ensure_binfmt()
            a.root.parent.mkdir(parents=True, exist_ok=True)
            lock = open(a.root.parent / f".{a.root.name}.lock", "w")
            fcntl.flock(lock, fcntl.LOCK_EX)  # one run at a time per root (they share its work directory)
            result["root_build_seconds"] = round(ensure_root(a.root), 1)
            (a.root / WORK.lstrip("/")).mkdir(parents=True, exist_ok=True)
            with lock, Mounts(a.root):
                step = time.perf_counter()
                share_network(a.root)
                ensure_venv(a.root)
                wheel = build_wheel(Path(tmp) / "wheel")
                result["aarch64_packages"] = install_runtime(a.root, wheel, a.offline)
                if not a.offline:
                    result["jetson_would_install"] = jetson_resolution(a.root, wheel)
                result["install_seconds"] = round(time.perf_counter() - step, 1)
                if not a.offline:
                    result["jetpack6_py310_wheels"] = {
                        "runtime": jetpack6_wheels(),
                        "export": jetpack6_wheels("export"),
                    }
                uname = chroot(a.root, "uname", "-m", capture_output=True, text=True).stdout.strip()
                pyver = chroot(
                    a.root,
                    f"{VENV}/bin/python",
                    "-c",
                    "import platform; print(platform.python_version())",
                    capture_output=True,
                    text=True,
                ).stdout.strip()
                result["emulated"] = {"machine": uname, "python": pyver, "debian": SUITE}
                for i, bundle in enumerate(bundles):
                    result["bundles"].append(check_bundle(a.root, Path(bundle), i))
    except (CheckFailed, subprocess.CalledProcessError, EdgegenError) as e:
        result["ok"], result["error"] = False, str(e)
    else:
        result["ok"] = all(b["ok"] for b in result["bundles"])
    result["total_seconds"] = round(time.perf_counter() - start, 1)
    text = json.dumps(result, indent=2, default=str)
    if a.json:
        a.json.write_text(text + "\n")
    print(text)
    print("aarch64 check: " + ("ok" if result["ok"] else "FAILED"), file=sys.stderr)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
