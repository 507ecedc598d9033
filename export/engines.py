"""``edgegen export --engines trt|trt-rtx``: strongly typed TensorRT engines from the bundle's fp16 / int8 ONNX.

One code path serves both flavours; they differ in the module name and in that TensorRT for RTX can build
ahead of time for a named GPU architecture without a GPU present (full TensorRT needs the target GPU).
A timing cache is kept beside the engines and reused by the next build.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

from edgegen.runtime.bundle import sha256_file
from edgegen.runtime.engines import collecting_logger, engine_dir, import_flavour
from edgegen.runtime.errors import BadInputError, ValidationFailedError

ENGINE_FORMS = ("fp16", "int8-qdq", "fp32")  # what engines are built from, when the bundle has it
DEFAULT_WORKSPACE_MB = 2048


def _capability_enum(trt, cc: str):
    name = "SM" + cc.replace(".", "")
    if not hasattr(trt, "ComputeCapability") or not hasattr(trt.ComputeCapability, name):
        known = [c for c in dir(getattr(trt, "ComputeCapability", object)) if c.startswith("SM")]
        raise BadInputError("--compute-capability", f"{cc} is not a target of this TensorRT",
                            f"known: {', '.join(k[2:3] + '.' + k[3:] for k in known) or 'only the GPU present'}")
    return getattr(trt.ComputeCapability, name)


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


def build_engines(root: Path, manifest: dict, flavour: str, compute_capability: str | None = None,
                  workspace_mb: int = DEFAULT_WORKSPACE_MB, progress: bool = True) -> tuple[list[dict], dict]:
    """Build an engine per component and form (fp16, int8-qdq; fp32 if nothing else) into ``root``.
    Returns (manifest engine entries, a build record with the timing cache's size before and after)."""
    trt = import_flavour(flavour)
    cc = compute_capability or local_compute_capability()
    if cc is None:
        raise BadInputError("--engines", "no CUDA GPU here to build for",
                            "pass --compute-capability (e.g. 8.9; trt-rtx builds ahead of time without a GPU), "
                            "or build on the target device")
    if flavour == "trt" and compute_capability and compute_capability != local_compute_capability():
        raise BadInputError("--compute-capability", "full TensorRT builds only for the GPU present",
                            "build on the target device (e.g. the Jetson itself)")
    out_dir = engine_dir(flavour, trt.__version__, cc)
    (root / out_dir).mkdir(parents=True, exist_ok=True)
    # One timing cache per machine, flavour, version and GPU, reused by every build; the bundle gets a copy.
    from .default import cache_dir
    cache_path = cache_dir() / "timing" / f"{Path(out_dir).name}.cache"
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    max_batch = int(manifest["generation"]["max_batch"])
    logger = collecting_logger(trt)  # TensorRT for RTX logs CUDA errors while building without a GPU
    entries = []
    jobs = [(name, form) for name, comp in manifest["components"].items() if name != "judge"
            for form in ENGINE_FORMS if form in comp["files"]]
    forms_present = {f for _, f in jobs}
    if forms_present - {"fp32"}:
        jobs = [(n, f) for n, f in jobs if f != "fp32"]
    build = {"flavour": flavour, "version": trt.__version__, "compute_capability": cc, "dir": out_dir,
             "timing_cache": f"{out_dir}/timing.cache", "workspace_mb": workspace_mb,
             "timing_cache_bytes_before": cache_path.stat().st_size if cache_path.exists() else 0}
    build_start = time.perf_counter()
    for i, (name, form) in enumerate(jobs, 1):
        start = time.perf_counter()
        onnx_rel = manifest["components"][name]["files"][form]
        builder = trt.Builder(logger)
        network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(root / onnx_rel)):
            errors = "; ".join(parser.get_error(k).desc().splitlines()[0] for k in range(parser.num_errors))
            raise ValidationFailedError(f"engine {name}.{form}", f"TensorRT cannot parse {onnx_rel}: {errors}",
                                        "report it with the bundle's manifest")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
        if flavour == "trt-rtx":  # ahead-of-time target; full TensorRT (Jetson) builds for the GPU present
            config.num_compute_capabilities = 1
            config.set_compute_capability(_capability_enum(trt, cc), 0)
        cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.exists() else b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
        profile = builder.create_optimization_profile()
        for k in range(network.num_inputs):
            tensor = network.get_input(k)
            rest = list(tensor.shape)[1:]
            profile.set_shape(tensor.name, [1, *rest], [1, *rest], [max_batch, *rest])
        config.add_optimization_profile(profile)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise ValidationFailedError(f"engine {name}.{form}", "TensorRT failed to build it: " + logger.errors(),
                                        "rerun with a larger --workspace-mb, or report it")
        rel = f"{out_dir}/{name}.{form}.engine"
        (root / rel).write_bytes(bytes(serialized))
        cache_path.write_bytes(bytes(config.get_timing_cache().serialize()))
        entries.append({"flavour": flavour, "version": trt.__version__, "compute_capability": cc,
                        "component": name, "form": form, "file": rel, "onnx": onnx_rel,
                        "onnx_sha256": sha256_file(root / onnx_rel), "strongly_typed": True,
                        "profile": {"min_batch": 1, "opt_batch": 1, "max_batch": max_batch}})
        if progress:
            print(f"  engine {i}/{len(jobs)} {rel} ({(root / rel).stat().st_size / 1e6:.1f} MB) in "
                  f"{time.perf_counter() - start:.1f}s", file=sys.stderr, flush=True)
    build["timing_cache_bytes_after"] = cache_path.stat().st_size
    (root / build["timing_cache"]).write_bytes(cache_path.read_bytes())
    build["seconds"] = round(time.perf_counter() - build_start, 1)
    return entries, build
