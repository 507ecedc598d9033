"""TensorRT engines in a bundle: which flavour and version built them, for which GPU, and whether this
machine can use them. Every check here runs before an engine is deserialized, in this order: the
flavour's module imports, a GPU is present, the engines' TensorRT version and compute capability match
this machine, the engine was built from the ONNX file the bundle ships now, the engine file's size and
sha256 match the manifest, and (TensorRT for RTX) the runtime's own validity check passes.

tensorrt / tensorrt_rtx are imported lazily and only here.
"""

from __future__ import annotations

import collections
import hashlib
import importlib
import os
import re
import shlex
from pathlib import Path

from .backends import BACKEND_SPECS
from .errors import BackendUnavailableError, BadBundleError, EngineMismatchError


def import_flavour(flavour: str):
    """The TensorRT Python module of ``flavour``, or BackendUnavailableError saying how to install it."""
    engines = BACKEND_SPECS[flavour].engines
    errors = []
    for name in engines.modules:
        try:
            return importlib.import_module(name)
        except ImportError as e:
            errors.append(str(e))
            continue
        except Exception as e:  # a binding whose native libraries fail to load raises other errors too
            errors.append(f"{name}: {type(e).__name__}: {e}")
    loaded = [e for e in errors if "No module named" not in e]
    raise BackendUnavailableError(
        f"backend {flavour}",
        f"its Python module ({' or '.join(engines.modules)}) "
        + (f"fails to load: {loaded[0]}" if loaded else "is not installed"),
        engines.install,
    )


def engine_dir(flavour: str, version: str, compute_capability: str) -> str:
    return f"engines/{flavour}-{version}-sm{compute_capability.replace('.', '')}"


def user_cache_dir() -> Path:
    """Where the runtime may write (ORT TensorRT EP engines, TensorRT-RTX kernel caches): ``$EDGEGEN_CACHE``
    or ~/.cache/edgegen, the same place the export side caches the default bundle."""
    return Path(os.environ.get("EDGEGEN_CACHE") or Path.home() / ".cache" / "edgegen")


def bundle_key(bundle) -> str:
    """A short id of a bundle's exact content: the sha256 of its manifest (which holds every file's hash)."""
    return hashlib.sha256((Path(bundle.root) / "manifest.json").read_bytes()).hexdigest()[:16]


def rebuild_hint(bundle, flavour: str) -> str:
    """The command that (re)builds ``flavour`` engines for ``bundle``: the lean runtime's, no torch needed."""
    return f"edgegen engines {shlex.quote(str(bundle.root))} --flavour {flavour} (on the target machine)"


def select_engines(
    manifest: dict, flavour: str, version: str, compute_capability: str | None, rebuild_hint: str
) -> list[dict]:
    """The engines of ``flavour`` built by this TensorRT version for this GPU; refuses the others by name."""
    entries = [e for e in manifest.get("engines", []) if e.get("flavour") == flavour]
    subject = f"bundle engines ({flavour})"
    if not entries:
        raise BackendUnavailableError(
            subject,
            "the bundle has no engines of this flavour",
            f"build them: {rebuild_hint}; or use --backend ort-cuda / ort-cpu",
        )
    versions = sorted({e["version"] for e in entries})
    if version not in versions:
        raise EngineMismatchError(
            subject,
            f"built with {flavour} {', '.join(versions)}, this machine has {version}",
            f"engines are not portable across TensorRT versions: rebuild with {rebuild_hint}, "
            "or use --backend ort-cuda",
        )
    entries = [e for e in entries if e["version"] == version]
    if compute_capability is not None:
        archs = sorted({e["compute_capability"] for e in entries})
        if compute_capability not in archs:
            raise EngineMismatchError(
                subject,
                f"built for compute capability {', '.join(archs)}, this GPU is {compute_capability}",
                f"engines are not portable across GPUs: rebuild on this machine with {rebuild_hint}, "
                "or use --backend ort-cuda",
            )
        entries = [e for e in entries if e["compute_capability"] == compute_capability]
    return entries


def check_sources(
    manifest: dict, entries: list[dict], rebuild_hint: str = "edgegen engines BUNDLE --flavour FLAVOUR"
) -> None:
    """Each engine must come from the ONNX file the bundle ships now (same sha256)."""
    for e in entries:
        onnx_entry = manifest["files"].get(e["onnx"])
        if onnx_entry is None or onnx_entry["sha256"] != e["onnx_sha256"]:
            raise EngineMismatchError(
                f"engine {e['file']}",
                f"was built from another version of {e['onnx']}",
                f"rebuild the engines after changing the ONNX files: {rebuild_hint}",
            )


def check_tensorrt_version(trt, flavour: str) -> None:
    """A release older than the flavour's ``min_major`` (full TensorRT before 10: JetPack 6.0 ships 8.6) has
    no strongly typed networks nor the runtime calls edgegen makes: say so instead of failing later on a
    missing attribute. TensorRT for RTX (1.x) has them from its first release."""
    engines = BACKEND_SPECS[flavour].engines
    major = str(trt.__version__).split(".")[0]
    if major.isdigit() and int(major) < engines.min_major:
        raise BackendUnavailableError(
            f"backend {flavour}",
            f"{engines.title} {trt.__version__} is too old: "
            f"edgegen's engines need {engines.title} >= {engines.min_major} "
            "(strongly typed networks)",
            "upgrade TensorRT (JetPack >= 6.1 ships 10.3), or use --backend ort-cuda",
        )


def capability_targets(trt) -> list[str]:
    """The compute capabilities this TensorRT for RTX builds for ('8.9', '12.0', ...), from its enum."""
    names = [n for n in dir(getattr(trt, "ComputeCapability", object)) if re.fullmatch(r"SM\d{2,3}", n)]
    return sorted((f"{n[2:-1]}.{n[-1]}" for n in names), key=lambda cc: tuple(map(int, cc.split("."))))


def check_rtx_target(trt, compute_capability: str) -> None:
    """TensorRT for RTX targets consumer/workstation GPUs (no Hopper sm90, for one): a GPU outside its targets
    cannot run its engines, so the backend does not load there."""
    targets = capability_targets(trt)
    if targets and compute_capability not in targets:
        raise BackendUnavailableError(
            "backend trt-rtx",
            f"this GPU (compute capability {compute_capability}) is "
            f"not a target of TensorRT for RTX {trt.__version__} "
            f"(targets: {', '.join(targets)})",
            "use --backend ort-cuda or ort-trt, or full TensorRT (--backend trt)",
        )


def machine(flavour: str) -> tuple[object, str, str]:
    """(module, TensorRT version, GPU compute capability) of this machine for ``flavour``; raises
    BackendUnavailableError if the module does not import, is too old, there is no usable GPU, or
    (TensorRT for RTX) the GPU is not one of its targets."""
    from . import cudart

    trt = import_flavour(flavour)
    check_tensorrt_version(trt, flavour)
    cc = cudart.runtime().compute_capability(0)
    if BACKEND_SPECS[flavour].engines.builds_ahead:  # it names the GPUs it targets
        check_rtx_target(trt, cc)
    return trt, trt.__version__, cc


def engines_here(bundle, flavour: str, version: str, compute_capability: str | None) -> list[dict]:
    """The bundle's engines this machine can use (version, GPU and source checks; nothing is read)."""
    hint = rebuild_hint(bundle, flavour)
    entries = select_engines(bundle.manifest, flavour, version, compute_capability, hint)
    check_sources(bundle.manifest, entries, hint)
    return entries


def engine_forms(entries: list[dict], components) -> set[str]:
    """The forms (fp16, int8-qdq, ...) that have an engine for every one of ``components``."""
    have = {(e["component"], e["form"]) for e in entries}
    forms = {e["form"] for e in entries}
    return {f for f in forms if all((c, f) in have for c in components)}


def find_engine(
    bundle, flavour: str, component: str, form: str, version: str, compute_capability: str | None
) -> dict:
    entries = engines_here(bundle, flavour, version, compute_capability)
    for e in entries:
        if e["component"] == component and e["form"] == form:
            return e
    built = sorted({f"{e['component']}.{e['form']}" for e in entries})
    raise BackendUnavailableError(
        f"bundle engines ({flavour})",
        f"no {component}.{form} engine for {flavour} {version}"
        + (f" on compute capability {compute_capability}" if compute_capability else "")
        + f" (built: {', '.join(built)})",
        f"choose a precision that has engines, or rebuild: {rebuild_hint(bundle, flavour)}",
    )


def read_engine(bundle, entry: dict) -> bytes:
    """The engine file's bytes, checked again against the manifest's size and sha256 (a bundle may have been
    opened without hashing, and deserializing is the one step that trusts the bytes)."""
    rel = entry["file"]
    listed = bundle.manifest["files"].get(rel)
    subject = f"engine {rel}"
    if listed is None:
        raise BadBundleError(
            subject,
            "is not listed with a hash in the manifest",
            f"rebuild the engines: {rebuild_hint(bundle, entry['flavour'])}",
        )
    path = bundle.path(rel)
    if not path.is_file():
        raise BadBundleError(subject, "file missing", f"rebuild: {rebuild_hint(bundle, entry['flavour'])}")
    blob = path.read_bytes()
    if len(blob) != listed["bytes"]:
        raise BadBundleError(
            subject,
            f"has {len(blob)} bytes, manifest says {listed['bytes']} (truncated?)",
            "copy the bundle again or rebuild the engines",
        )
    if hashlib.sha256(blob).hexdigest() != listed["sha256"]:
        raise BadBundleError(
            subject,
            "does not match its sha256 in the manifest",
            "the file is damaged or was modified; copy the bundle again or rebuild the engines",
        )
    return blob


class _Messages:
    """Keeps TensorRT's recent log lines (shown when something fails) instead of printing them."""

    def __init__(self):
        self.lines = collections.deque(maxlen=64)

    def errors(self, count: int = 3) -> str:
        bad = [m for sev, m in self.lines if sev <= 1] or [m for _, m in self.lines]
        return " | ".join(line.splitlines()[0][:300] for line in bad[-count:]) or "no message"


def collecting_logger(trt):
    """A TensorRT logger that keeps messages instead of printing them (TensorRT for RTX logs CUDA errors
    while it builds ahead of time on a machine without a GPU)."""

    class Collect(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.kept = _Messages()
            self.messages = []  # the last 200 lines, any severity

        def log(self, severity, msg):
            self.kept.lines.append((int(severity), str(msg)))
            self.messages.append(str(msg))
            del self.messages[:-200]

        def errors(self, count: int = 3) -> str:
            return self.kept.errors(count)

    return Collect()


def check_validity(trt, runtime, blob: bytes, subject: str, hint: str, logger) -> None:
    """TensorRT for RTX can say, without deserializing, whether an engine suits this machine. Full
    TensorRT 10.3 (JetPack 6) has no such call: there the deserialization itself is the check."""
    if not hasattr(runtime, "get_engine_validity"):
        return
    validity, diagnostics = runtime.get_engine_validity(blob)
    if int(validity) != int(trt.EngineValidity.INVALID):
        return
    flags = {
        name
        for name, bit in trt.EngineInvalidityDiagnostics.__members__.items()
        if int(diagnostics) & int(bit)
    }
    if "MALFORMED_ENGINE" in flags:
        raise BadBundleError(
            subject,
            "is not a valid TensorRT-RTX engine (its header is malformed)",
            f"the file is damaged or was not written by this TensorRT-RTX; rebuild: {hint}",
        )
    if "VERSION_MISMATCH" in flags:
        raise EngineMismatchError(
            subject,
            f"was built by another TensorRT-RTX version than this one ({trt.__version__})",
            f"rebuild: {hint}; or use --backend ort-cuda",
        )
    if "UNSUPPORTED_CC" in flags:
        raise EngineMismatchError(
            subject,
            "was not built for this GPU's compute capability",
            f"rebuild: {hint}; or use --backend ort-cuda",
        )
    if flags & {"OLD_CUDA_DRIVER", "OLD_CUDA_RUNTIME"}:
        raise BackendUnavailableError(
            subject,
            f"needs a newer CUDA driver/runtime ({', '.join(sorted(flags))})",
            "update the NVIDIA driver, or use --backend ort-cuda",
        )
    if "INSUFFICIENT_GPU_MEMORY" in flags:
        raise BackendUnavailableError(
            subject,
            "does not fit in this GPU's free memory",
            "close other GPU programs, or use a smaller precision / --backend ort-cuda",
        )
    raise BackendUnavailableError(
        subject,
        f"TensorRT-RTX cannot run it here: {logger.errors()}",
        "run `edgegen doctor` to check the GPU and driver",
    )


def load_engine(
    bundle,
    flavour: str,
    component: str,
    form: str,
    trt=None,
    version: str | None = None,
    compute_capability: str | None = None,
):
    """Check, then deserialize, the engine of ``component`` in ``form``. Returns (engine, runtime, logger,
    entry). ``trt``/``version``/``compute_capability`` default to this machine's (tests pass them to run
    the checks on a machine without a GPU)."""
    if trt is None:
        trt, version, compute_capability = machine(flavour)
    version = version or trt.__version__
    entry = find_engine(bundle, flavour, component, form, version, compute_capability)
    blob = read_engine(bundle, entry)
    subject, hint = f"engine {entry['file']}", rebuild_hint(bundle, flavour)
    logger = collecting_logger(trt)
    runtime = trt.Runtime(logger)
    check_validity(trt, runtime, blob, subject, hint, logger)
    engine = runtime.deserialize_cuda_engine(blob)
    if engine is None:
        title = BACKEND_SPECS[flavour].engines.title
        raise BadBundleError(
            subject,
            f"{title} {trt.__version__} could not deserialize it: {logger.errors()}",
            f"the file is damaged or does not suit this machine; rebuild: {hint}",
        )
    return engine, runtime, logger, entry
