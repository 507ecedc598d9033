"""The bundle: a directory with manifest.json, verified before anything heavy runs.

This module is the contract between export (which writes bundles) and the
runtime (which reads them). Everything a reader needs to know about a bundle is
in its manifest; nothing is inferred from file names.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import BadBundleError

SCHEMA = "edgegen.bundle/1"
# The tensor dtypes a manifest may name, and the numpy type each is held in by every graph.
NP_DTYPES = {
    "float32": np.float32,
    "float16": np.float16,
    "int64": np.int64,
    "int32": np.int32,
    "uint8": np.uint8,
    "bool": np.bool_,
}
MANIFEST = "manifest.json"
PRECISIONS = ("fp32", "fp16", "int8")
# The files a precision is stored as. int8 has two forms: "int8" for CPUs (dynamically quantized text
# encoder, static QDQ generator) and "int8-qdq" (static QDQ throughout) for GPU providers and TensorRT.
FORMS = {"fp32": ("fp32",), "fp16": ("fp16",), "int8": ("int8", "int8-qdq")}


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_entry(root: Path, rel: str) -> dict:
    path = root / rel
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size}


def safe_path(root: Path, rel: Any) -> Path:
    """Resolve ``rel`` inside ``root``; refuse anything that leaves it (``..``, absolute, symlinks)."""
    if not isinstance(rel, str) or not rel or "\x00" in rel:
        raise BadBundleError(
            f"bundle {root}",
            f"file path is not a non-empty string: {rel!r}",
            "the manifest is damaged; re-export the bundle",
        )
    pure = Path(rel)
    if pure.is_absolute() or ".." in pure.parts or rel.startswith(("/", "\\")) or ":" in pure.parts[0]:
        raise BadBundleError(
            f"bundle {root}",
            f"file path leaves the bundle directory: {rel!r}",
            "paths in manifest.json must be relative and stay inside the bundle; re-export it",
        )
    real_root = root.resolve()
    resolved = (root / pure).resolve()
    if not resolved.is_relative_to(real_root):
        raise BadBundleError(
            f"bundle {root}",
            f"file path leaves the bundle directory through a link: {rel!r}",
            "bundles must not contain symbolic links pointing outside; re-export it",
        )
    return resolved


# The token axis of text inputs and states. Where a graph has it dynamic, ONNX Runtime on the CPU runs
# each call at the prompt's own length (padding costs compute there); fixed-shape paths (TensorRT
# engines, CUDA graphs) run it at the tokenizer's max_length. Every other named axis is the batch.
SEQUENCE_AXIS = "sequence"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    shape: tuple  # ints and axis names (str) for dynamic axes

    def resolve(self, batch: int, sequence: int) -> tuple[int, ...]:
        """The concrete shape at this batch size and token count."""
        return tuple(
            d if isinstance(d, int) else sequence if d == SEQUENCE_AXIS else batch for d in self.shape
        )

    @classmethod
    def from_json(cls, d: dict) -> TensorSpec:
        return cls(d["name"], d["dtype"], tuple(d["shape"]))

    def to_json(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass(frozen=True)
class OutputRef:
    """One output of one component, as the manifest's ``reference_outputs`` names it."""

    component: str
    output: str

    def to_json(self) -> dict:
        return {"component": self.component, "output": self.output}


# What bundles written before the manifest had ``reference_outputs`` used (gan and diffusion alike).
_LEGACY_REFERENCE_OUTPUTS = {
    "pixels": OutputRef("fused", "pixels"),
    "text_states": OutputRef("fused", "text_states"),
}


@dataclass(frozen=True)
class Component:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    files: dict  # precision -> relative path of the ONNX file

    @property
    def dynamic_sequence(self) -> bool:
        return any(SEQUENCE_AXIS in t.shape for t in self.inputs)


class Bundle:
    """A verified bundle. ``Bundle.open`` checks schema, paths, sizes and hashes."""

    def __init__(self, root: Path, manifest: dict):
        self.root = root
        self.manifest = manifest
        self.family: str = manifest["family"]
        self.components = {
            name: Component(
                name,
                tuple(TensorSpec.from_json(t) for t in c["inputs"]),
                tuple(TensorSpec.from_json(t) for t in c["outputs"]),
                dict(c["files"]),
            )
            for name, c in manifest["components"].items()
        }

    @property
    def precisions(self) -> list[str]:
        return list(self.manifest["precisions"])

    @property
    def forms(self) -> list[str]:
        return [f for p in self.precisions for f in FORMS[p]]

    @property
    def tokenizer_settings(self) -> dict:
        return self.manifest["tokenizer"]

    @property
    def max_length(self) -> int:
        """Token positions at most: what the sequence axis is on fixed-shape paths."""
        return int(self.manifest["tokenizer"]["max_length"])

    @property
    def generation(self) -> dict:
        return self.manifest["generation"]

    def reference_output(self, role: str) -> OutputRef | None:
        """The component output that stands for ``role`` in the checks, as the family named it at export:
        ``"pixels"`` (what a call with the bundle's default options returns for a reference case's prompts
        and seeds) or ``"text_states"`` (the text conditioning the quality gates score); None if none."""
        named = self.manifest.get("reference_outputs")
        if named is None:
            ref = _LEGACY_REFERENCE_OUTPUTS.get(role)
            if ref is not None and ref.component not in self.components:
                ref = OutputRef("text_encoder", ref.output) if role == "text_states" else None
            return ref
        entry = named.get(role)
        return OutputRef(entry["component"], entry["output"]) if entry else None

    def path(self, rel: str) -> Path:
        return safe_path(self.root, rel)

    def onnx_path(self, component: str, form: str) -> Path:
        comp = self.components.get(component)
        if comp is None:
            raise BadBundleError(
                f"bundle {self.root}", f"no component {component!r}", f"it has {sorted(self.components)}"
            )
        if form not in comp.files:
            raise BadBundleError(
                f"bundle {self.root}",
                f"component {component!r} has no {form} file",
                f"forms present: {sorted(comp.files)}; re-export with --precision {form.split('-')[0]}",
            )
        return self.path(comp.files[form])

    def report(self) -> dict:
        rel = "report.json"
        if rel not in self.manifest["files"]:
            return {}
        try:
            report = json.loads(self.path(rel).read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise BadBundleError(
                f"bundle {self.root}", f"report.json is not valid JSON: {e}", "re-export the bundle"
            ) from None
        return report if isinstance(report, dict) else {}

    @classmethod
    def open(cls, root: str | os.PathLike, verify_hashes: bool = True) -> Bundle:
        root = Path(root)
        subject = f"bundle {root}"
        manifest_path = root / MANIFEST
        if not root.is_dir():
            raise BadBundleError(
                subject, "not a directory", "pass the directory that `edgegen export -o` wrote"
            )
        if not manifest_path.is_file():
            raise BadBundleError(
                subject, f"no {MANIFEST}", "this is not an edgegen bundle; export one with `edgegen export`"
            )
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise BadBundleError(
                subject, f"{MANIFEST} is not valid JSON: {e}", "re-export the bundle"
            ) from None
        _check_structure(subject, manifest)
        for rel, entry in manifest["files"].items():
            path = safe_path(root, rel)
            if not path.is_file():
                raise BadBundleError(
                    subject, f"file missing: {rel}", "the bundle is incomplete; copy it again or re-export it"
                )
            size = path.stat().st_size
            if size != entry["bytes"]:
                raise BadBundleError(
                    subject,
                    f"file {rel} has {size} bytes, manifest says {entry['bytes']}",
                    "the file was truncated or replaced; copy the bundle again or re-export it",
                )
            if verify_hashes and sha256_file(path) != entry["sha256"]:
                raise BadBundleError(
                    subject,
                    f"file {rel} does not match its sha256 in the manifest",
                    "the file is damaged or was modified; copy the bundle again or re-export it",
                )
        listed = set(manifest["files"])
        for comp in manifest["components"].values():
            for _precision, rel in comp["files"].items():
                if rel not in listed:
                    raise BadBundleError(
                        subject,
                        f"component file {rel} is not listed with a hash",
                        "the manifest is damaged; re-export the bundle",
                    )
        for rel in {r for c in manifest["components"].values() for r in c["files"].values()}:
            _check_external_data(root, rel, listed)
        tok = manifest["tokenizer"].get("file", "tokenizer.json")
        if tok not in listed:
            raise BadBundleError(
                subject, f"tokenizer file {tok} is not listed with a hash", "re-export the bundle"
            )
        return cls(root, manifest)


def _check_external_data(root: Path, rel: str, listed: set[str]) -> None:
    """An ONNX file's external weights must be files of this bundle, listed (and so hashed) in the
    manifest."""
    from .onnx_scan import external_data_locations

    try:
        locations = external_data_locations(safe_path(root, rel).read_bytes())
    except ValueError as e:
        raise BadBundleError(
            f"bundle {root}", f"{rel} is not a readable ONNX model ({e})", "re-export the bundle"
        ) from None
    for location in locations:
        inner = (Path(rel).parent / location).as_posix()
        safe_path(root, inner)  # refuses ../, absolute paths and links out of the bundle
        if os.path.normpath(inner) not in listed:
            raise BadBundleError(
                f"bundle {root}",
                f"{rel} loads weights from {location!r}, which the manifest does not list",
                "every file a model reads must be listed with its hash; re-export the bundle",
            )


def _require(subject: str, where: str, d: dict, fields: dict) -> None:
    for key, kind in fields.items():
        value = d.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise BadBundleError(
                subject,
                f"manifest {where}.{key} is missing or not a {kind.__name__}: {value!r}",
                "the manifest is damaged; re-export the bundle",
            )


def _check_structure(subject: str, m: Any) -> None:
    """Refuse manifests that are not what this runtime understands, with a readable reason."""
    if not isinstance(m, dict):
        raise BadBundleError(subject, "manifest.json is not a JSON object", "re-export the bundle")
    schema = m.get("schema")
    if schema != SCHEMA:
        raise BadBundleError(
            subject,
            f"unknown bundle schema: {schema!r}",
            f"this edgegen reads {SCHEMA!r}; upgrade edgegen or re-export the bundle with this version",
        )
    expected = {
        "family": str,
        "components": dict,
        "files": dict,
        "precisions": list,
        "tokenizer": dict,
        "generation": dict,
    }
    for key, kind in expected.items():
        if not isinstance(m.get(key), kind):
            raise BadBundleError(
                subject,
                f"manifest field {key!r} is missing or not a {kind.__name__}",
                "the manifest is damaged; re-export the bundle",
            )
    for rel, entry in m["files"].items():
        if not (
            isinstance(entry, dict)
            and isinstance(entry.get("sha256"), str)
            and isinstance(entry.get("bytes"), int)
        ):
            raise BadBundleError(
                subject, f"files[{rel!r}] needs sha256 (str) and bytes (int)", "re-export the bundle"
            )
    if not m["precisions"]:
        raise BadBundleError(subject, "lists no precisions", "re-export the bundle")
    for p in m["precisions"]:
        if p not in PRECISIONS:
            raise BadBundleError(subject, f"unknown precision {p!r}", f"known: {', '.join(PRECISIONS)}")
    _require(
        subject,
        "tokenizer",
        m["tokenizer"],
        {"file": str, "max_length": int, "pad_id": int, "pad_token": str},
    )
    _require(subject, "generation", m["generation"], {"max_batch": int})
    if m["tokenizer"]["max_length"] < 1 or m["generation"]["max_batch"] < 1:
        raise BadBundleError(
            subject, "tokenizer.max_length and generation.max_batch must be positive", "re-export the bundle"
        )
    for name, c in m["components"].items():
        ok = (
            isinstance(c, dict)
            and isinstance(c.get("files"), dict)
            and isinstance(c.get("inputs"), list)
            and isinstance(c.get("outputs"), list)
        )
        if ok:
            try:
                for t in c["inputs"] + c["outputs"]:
                    spec = TensorSpec.from_json(t)
                    ok = (
                        ok
                        and isinstance(spec.name, str)
                        and spec.dtype in NP_DTYPES
                        and all(
                            (isinstance(d, int) and not isinstance(d, bool) and d > 0)
                            or (isinstance(d, str) and d)
                            for d in spec.shape
                        )
                    )
                ok = ok and all(isinstance(f, str) and isinstance(r, str) for f, r in c["files"].items())
                ok = ok and isinstance(c.get("tolerance", {}), dict)
            except (KeyError, TypeError):
                ok = False
        if not ok:
            raise BadBundleError(
                subject,
                f"component {name!r} is malformed (needs files, inputs, outputs)",
                "re-export the bundle",
            )
    _check_reference_outputs(subject, m)


def _check_reference_outputs(subject: str, m: dict) -> None:
    """Each entry of ``reference_outputs`` (older bundles lack it) names an output of a component."""
    named = m.get("reference_outputs", {})
    if not isinstance(named, dict):
        raise BadBundleError(
            subject, "manifest field 'reference_outputs' is not an object", "re-export the bundle"
        )
    for role, entry in named.items():
        comp = m["components"].get(entry.get("component")) if isinstance(entry, dict) else None
        outputs = [t.get("name") for t in comp["outputs"]] if comp else []
        if comp is None or entry.get("output") not in outputs:
            raise BadBundleError(
                subject,
                f"reference_outputs[{role!r}] names no output of a component: {entry!r}",
                "the manifest is damaged; re-export the bundle",
            )
