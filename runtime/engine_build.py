"""``edgegen engines BUNDLE --flavour trt|trt-rtx``: build strongly typed TensorRT engines for an existing
bundle, on the machine that will run them, with the lean runtime alone (no torch). ``edgegen export
--engines`` calls the same ``add_engines`` on the bundle it has just written.

Engines are built from the bundle's fp16 / int8-qdq ONNX files (fp32 when it has nothing else), one per
component and form, with an optimisation profile over the batch sizes the bundle allows. Full TensorRT
(Jetson) builds for the GPU present; TensorRT for RTX can build ahead of time for a named compute
capability without a GPU. One timing cache per machine, flavour, version and GPU is kept in the user cache
and reused by every build; the bundle gets a copy beside its engines.

The bundle changes only when every engine is built, and only through renames:
  1. build into a staging directory inside the bundle (unlisted, so the bundle still verifies);
  2. if engines of the same flavour, version and GPU exist, write the manifest without them, then move
     their directory aside;
  3. rename the staging directory to ``engines/<flavour>-<version>-sm<cc>/``;
  4. replace manifest.json (written to a temporary file first) with one that lists the new files and
     their ``engines`` entries; remove the old directory.
A build that fails or is interrupted leaves the bundle byte for byte as it was (only step 1 has run), and
the bundle verifies after every step. SIGINT / SIGTERM during steps 2-4 wait until step 4 is done.

tensorrt / tensorrt_rtx are imported only when a build starts.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from .backends import BACKEND_SPECS, ENGINE_FLAVOURS, flavour_choices
from .bundle import MANIFEST, Bundle, file_entry
from .engines import (
    capability_targets,
    check_tensorrt_version,
    collecting_logger,
    engine_dir,
    import_flavour,
    user_cache_dir,
)
from .errors import BadInputError, ValidationFailedError
from .lora import target_initializers

ENGINE_FORMS = ("fp16", "int8-qdq", "fp32")  # what engines are built from, when the bundle has it
DEFAULT_WORKSPACE_MB = 2048
STAGING_PREFIX = ".edgegen-engines-"  # work directories inside the bundle; safe to delete when no build runs
BUILD_RECORD = "build.json"  # beside the engines: how they were built (timing cache sizes, seconds)


def local_compute_capability() -> str | None:
    """The first CUDA GPU's compute capability via the driver API (ctypes; no torch), or None."""
    import ctypes

    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    count, major, minor = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
    if cuda.cuInit(0) != 0 or cuda.cuDeviceGetCount(ctypes.byref(count)) != 0 or count.value < 1:
        return None
    cuda.cuDeviceGetAttribute(ctypes.byref(major), 75, 0)  # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR
    cuda.cuDeviceGetAttribute(ctypes.byref(minor), 76, 0)  # ..._MINOR
    return f"{major.value}.{minor.value}"


def _capability_enum(trt, cc: str):
    name = "SM" + cc.replace(".", "")
    if not hasattr(trt, "ComputeCapability") or not hasattr(trt.ComputeCapability, name):
        raise BadInputError(
            "--compute-capability",
            f"{cc} is not a target of this TensorRT",
            f"known: {', '.join(capability_targets(trt)) or 'only the GPU present'}",
        )
    return getattr(trt.ComputeCapability, name)


def check_options(flavour: str, compute_capability: str | None, workspace_mb) -> None:
    """Refuse bad options before anything is imported or built."""
    if flavour not in ENGINE_FLAVOURS:
        raise BadInputError("--flavour", f"unknown engine flavour {flavour!r}", f"use {flavour_choices()}")
    if compute_capability is not None and not re.fullmatch(r"\d{1,2}\.\d", str(compute_capability)):
        raise BadInputError(
            "--compute-capability",
            f"expected MAJOR.MINOR, got {compute_capability!r}",
            "e.g. 8.7 (Jetson Orin), 8.9 (RTX 40xx)",
        )
    if not isinstance(workspace_mb, int) or isinstance(workspace_mb, bool) or workspace_mb < 1:
        raise BadInputError(
            "--workspace-mb", f"expected a positive number of MiB, got {workspace_mb!r}", "e.g. 2048"
        )


def target_capability(flavour: str, compute_capability: str | None) -> str:
    """The compute capability to build for: the one asked for (trt-rtx), or the GPU present's."""
    local = local_compute_capability()
    ahead = BACKEND_SPECS[flavour].engines.builds_ahead
    if not ahead and compute_capability and compute_capability != local:
        raise BadInputError(
            "--compute-capability",
            f"full TensorRT builds only for the GPU present "
            f"({local or 'none here'}), not for {compute_capability}",
            "build on the target device (e.g. the Jetson itself), without --compute-capability",
        )
    cc = compute_capability or local
    if cc is None:
        raise BadInputError(
            f"engines {flavour}",
            "no CUDA GPU here to build for",
            "build on the target device"
            + (
                "; or pass --compute-capability (e.g. 8.9): TensorRT for RTX builds ahead of time "
                "without a GPU"
                if ahead
                else ""
            ),
        )
    return cc


def engine_jobs(manifest: dict) -> list[tuple[str, str]]:
    """(component, form) pairs to build: fp16 and int8-qdq where present, fp32 only if neither is."""
    jobs = [
        (name, form)
        for name, comp in manifest["components"].items()
        if name != "judge"
        for form in ENGINE_FORMS
        if form in comp["files"]
    ]
    if {f for _, f in jobs} - {"fp32"}:
        jobs = [(n, f) for n, f in jobs if f != "fp32"]
    return jobs


def add_engines(
    bundle_root,
    flavour: str,
    compute_capability: str | None = None,
    workspace_mb: int = DEFAULT_WORKSPACE_MB,
    progress: bool = True,
    refittable: bool = False,
) -> dict:
    """Build ``flavour`` engines for the bundle at ``bundle_root`` and record them in its manifest (see the
    module docstring for how the bundle is updated). Engines of the same flavour, version and GPU are
    replaced. ``refittable``: engines whose weights can be replaced after loading (LoRAs merged at load),
    at some cost in speed; only those of graphs with weights a LoRA may target (not the VAE's). Returns
    {bundle, dir, flavour, version, compute_capability, engines, build, replaced}."""
    check_options(flavour, compute_capability, workspace_mb)
    root = Path(bundle_root)
    bundle = Bundle.open(root)  # schema and every hash: engines are built from the files the manifest lists
    trt = import_flavour(flavour)
    check_tensorrt_version(trt, flavour)  # before STRONGLY_TYPED is looked up: TensorRT 8.6 has none
    cc = target_capability(flavour, compute_capability)
    if BACKEND_SPECS[flavour].engines.builds_ahead:
        _capability_enum(trt, cc)  # a target this TensorRT for RTX knows, before anything is built
    rel_dir = engine_dir(flavour, trt.__version__, cc)
    jobs = engine_jobs(bundle.manifest)
    if refittable and not bundle.manifest.get("lora", {}).get("targets"):
        raise BadInputError(
            "--refittable",
            f"bundle {root} records no weights a LoRA may target",
            "refittable engines serve LoRAs merged at load: diffusion bundles exported by this edgegen",
        )
    if not jobs:
        raise BadInputError(
            f"bundle {root}",
            "has no fp16, int8-qdq or fp32 files to build engines from",
            "re-export it with --precision fp16,int8",
        )
    with _Interrupts() as interrupts:
        staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=root))
        try:
            staging.chmod(0o755)
            entries, build = build_engines(
                trt, bundle, jobs, flavour, cc, rel_dir, staging, workspace_mb, progress, refittable
            )
            manifest, replaced = _updated_manifest(bundle.manifest, rel_dir, entries, staging)
            with interrupts.held():
                _switch(root, bundle.manifest, staging, rel_dir, manifest)
        finally:
            shutil.rmtree(staging, ignore_errors=True)  # gone already after a successful switch
    Bundle.open(
        root, verify_hashes=False
    )  # the new manifest reads back; the new files' hashes were just taken
    return {
        "bundle": str(root),
        "dir": rel_dir,
        "flavour": flavour,
        "version": trt.__version__,
        "compute_capability": cc,
        "engines": entries,
        "build": build,
        "replaced": replaced,
    }


def build_engines(
    trt,
    bundle,
    jobs,
    flavour: str,
    cc: str,
    rel_dir: str,
    out: Path,
    workspace_mb: int,
    progress: bool,
    refittable: bool = False,
) -> tuple[list[dict], dict]:
    """Build each (component, form) of ``jobs`` into the directory ``out`` (it becomes ``rel_dir``).
    Returns (manifest engine entries, the build record also written to ``out/build.json``)."""
    manifest = bundle.manifest
    cache_path = user_cache_dir() / "timing" / f"{Path(rel_dir).name}.cache"
    bundled_cache = f"{rel_dir}/timing.cache"
    if cache_path.is_file():
        cache, cache_source, where = cache_path.read_bytes(), "user cache", str(cache_path)
    elif bundled_cache in manifest["files"]:  # this bundle's own cache for this flavour, version and GPU
        cache, cache_source, where = bundle.path(bundled_cache).read_bytes(), "bundle", bundled_cache
    else:
        cache, cache_source, where = b"", None, None
    max_batch, max_length = int(manifest["generation"]["max_batch"]), bundle.max_length
    logger = collecting_logger(trt)  # TensorRT for RTX logs CUDA errors while building without a GPU
    build = {
        "flavour": flavour,
        "version": trt.__version__,
        "compute_capability": cc,
        "dir": rel_dir,
        "timing_cache": bundled_cache,
        "timing_cache_source": cache_source,
        "workspace_mb": workspace_mb,
        "refittable": refittable,
        "timing_cache_bytes_before": len(cache),
        "engines": {},
    }
    if progress:
        print(
            f"building {len(jobs)} {flavour} {trt.__version__} engines for compute capability {cc} "
            f"({'timing cache ' + where if where else 'new timing cache'})",
            file=sys.stderr,
            flush=True,
        )
    entries, notes, printed, build_start = [], build.setdefault("notes", []), 0, time.perf_counter()
    for i, (name, form) in enumerate(jobs, 1):
        start = time.perf_counter()
        onnx_rel = manifest["components"][name]["files"][form]
        # refittable: only the engines of graphs with weights a LoRA may target (not the VAE's)
        refit_names = (target_initializers(bundle, name, form) or None) if refittable else None
        blob, cache = _build_one(
            trt,
            logger,
            bundle.path(onnx_rel),
            f"{name}.{form}",
            onnx_rel,
            flavour,
            cc,
            workspace_mb,
            max_batch,
            max_length,
            cache,
            notes=notes,
            refit_names=refit_names,
        )
        _write(cache_path, cache)  # after every engine: an interrupted build keeps what it measured
        rel = f"{rel_dir}/{name}.{form}.engine"
        _write(out / Path(rel).name, blob)
        entries.append(
            {
                "flavour": flavour,
                "version": trt.__version__,
                "compute_capability": cc,
                "component": name,
                "form": form,
                "file": rel,
                "onnx": onnx_rel,
                "onnx_sha256": manifest["files"][onnx_rel]["sha256"],
                "strongly_typed": True,
                "refittable": refit_names is not None,
                "profile": {"min_batch": 1, "opt_batch": 1, "max_batch": max_batch, "sequence": max_length},
            }
        )
        seconds = time.perf_counter() - start
        build["engines"][rel] = {"bytes": len(blob), "seconds": round(seconds, 1)}
        if progress:
            for note in notes[printed:]:
                print(f"  note: {note}", file=sys.stderr, flush=True)
            printed = len(notes)
            print(
                f"  engine {i}/{len(jobs)} {rel} ({len(blob) / 1e6:.1f} MB) in {seconds:.1f}s",
                file=sys.stderr,
                flush=True,
            )
    _write(out / "timing.cache", cache)
    build["timing_cache_bytes_after"] = len(cache)
    build["seconds"] = round(time.perf_counter() - build_start, 1)
    _write(out / BUILD_RECORD, json.dumps(build, indent=2).encode())
    return entries, build


def _build_one(
    trt,
    logger,
    onnx_path: Path,
    what: str,
    onnx_rel: str,
    flavour: str,
    cc: str,
    workspace_mb: int,
    max_batch: int,
    max_length: int,
    cache: bytes,
    notes: list | None = None,
    refit_names: list[str] | None = None,
) -> tuple[bytes, bytes]:
    """One strongly typed engine (TensorRT 10.3 builder API; plus the target GPU for TensorRT for RTX).
    ``refit_names``: the ONNX initializers a refit may replace (``mark_refittable``; TensorRT for RTX 1.7
    needs a GPU to build such an engine: its JIT compiles refittable weights' kernels). Returns
    (serialized engine, the timing cache after the build); what it had to work around goes into ``notes``."""
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(parser.get_error(k).desc().splitlines()[0] for k in range(parser.num_errors))
        raise ValidationFailedError(
            f"engine {what}",
            f"TensorRT cannot parse {onnx_rel}: {errors}",
            "report it with the bundle's manifest",
        )
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
    if refit_names is not None:
        mark_refittable(trt, network, config, refit_names, what)
    if BACKEND_SPECS[flavour].engines.builds_ahead:  # a named target; full TensorRT builds for the GPU here
        config.num_compute_capabilities = 1
        config.set_compute_capability(_capability_enum(trt, cc), 0)
    timing = _use_timing_cache(config, cache, what, notes if notes is not None else [])
    profile = builder.create_optimization_profile()
    for k in range(network.num_inputs):
        tensor = network.get_input(k)
        # the dynamic sequence axis (token inputs) is fixed at max_length: the runtime pads to it on engines
        rest = [d if d >= 0 else max_length for d in list(tensor.shape)[1:]]
        profile.set_shape(tensor.name, [1, *rest], [1, *rest], [max_batch, *rest])
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ValidationFailedError(
            f"engine {what}",
            "TensorRT failed to build it: " + logger.errors(),
            "rerun with a larger --workspace-mb, or report it",
        )
    return bytes(serialized), bytes((config.get_timing_cache() or timing).serialize())


def mark_refittable(trt, network, config, names: list[str], what: str) -> None:
    """Let a refit replace these weights (by ONNX initializer name) after loading; the rest stay constants
    the builder may fold (REFIT_INDIVIDUAL)."""
    config.set_flag(trt.BuilderFlag.REFIT_INDIVIDUAL)
    for name in names:
        if not network.mark_weights_refittable(name):
            raise ValidationFailedError(
                f"engine {what}", f"TensorRT has no weight {name!r} to make refittable", "report it"
            )


def _use_timing_cache(config, cache: bytes, what: str, notes: list):
    """Give the build ``cache``; TensorRT refuses (returns False) a cache written on another device or
    version, and the build would then have none: start a fresh one instead, and say so. Returns the cache."""
    timing = config.create_timing_cache(cache)
    if config.set_timing_cache(timing, ignore_mismatch=False) or not cache:
        return timing
    notes.append(
        f"{what}: the timing cache ({len(cache)} bytes) was made on another GPU or TensorRT version; "
        "started a fresh one (this build measures every kernel again)"
    )
    timing = config.create_timing_cache(b"")
    config.set_timing_cache(timing, ignore_mismatch=False)
    return timing


def _updated_manifest(manifest: dict, rel_dir: str, entries: list[dict], staging: Path) -> tuple[dict, int]:
    """``manifest`` with the engines of ``rel_dir`` (same flavour, version and GPU) replaced by ``entries``
    and the files of ``rel_dir`` replaced by what ``staging`` holds. Returns (manifest, entries replaced)."""
    new = dict(manifest)
    old = [e for e in manifest.get("engines", []) if _in_dir(e["file"], rel_dir)]
    new["engines"] = [e for e in manifest.get("engines", []) if not _in_dir(e["file"], rel_dir)] + entries
    files = {rel: entry for rel, entry in manifest["files"].items() if not _in_dir(rel, rel_dir)}
    for path in sorted(staging.iterdir()):
        files[f"{rel_dir}/{path.name}"] = file_entry(staging, path.name)
    new["files"] = dict(sorted(files.items()))
    return new, len(old)


def _without(manifest: dict, rel_dir: str) -> dict:
    """``manifest`` without the engines and files under ``rel_dir``."""
    new = dict(manifest)
    new["engines"] = [e for e in manifest.get("engines", []) if not _in_dir(e["file"], rel_dir)]
    new["files"] = {rel: entry for rel, entry in manifest["files"].items() if not _in_dir(rel, rel_dir)}
    return new


def _in_dir(rel: str, rel_dir: str) -> bool:
    return rel.startswith(rel_dir + "/")


def _switch(root: Path, manifest: dict, staging: Path, rel_dir: str, new_manifest: dict) -> None:
    """Put the staged engines in place and the new manifest over the old one; the bundle verifies after
    each step (see the module docstring)."""
    target = root / rel_dir
    aside = None
    if target.exists():
        if any(_in_dir(rel, rel_dir) for rel in manifest["files"]):
            _write(root / MANIFEST, _manifest_bytes(_without(manifest, rel_dir)))
        aside = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX + "old-", dir=root))
        target.rename(aside / "engines")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging.rename(target)
    _write(root / MANIFEST, _manifest_bytes(new_manifest))
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def _manifest_bytes(manifest: dict) -> bytes:
    return json.dumps(manifest, indent=2).encode()


def _write(path: Path, data: bytes) -> None:
    """Write ``path`` through a temporary file beside it, flushed to disk, then renamed over it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class _Interrupts:
    """SIGINT and SIGTERM raise KeyboardInterrupt during a build (so its work directory is removed), and wait
    while ``held()``: the few renames that switch the bundle over are never cut in half. Only in the main
    thread (elsewhere signals are not delivered to Python code anyway)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.holding, self.pending, self.previous = False, None, {}

    def _handle(self, signum, frame):
        if self.holding:
            self.pending = signum
        else:
            raise KeyboardInterrupt

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)
        return False

    @contextmanager
    def held(self):
        self.holding = True
        try:
            yield
        finally:
            self.holding = False
        if self.pending is not None:
            raise KeyboardInterrupt
