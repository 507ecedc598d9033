"""LoRA files: reading them (diffusers/PEFT and kohya naming, safetensors) and merging them into a bundle's
weights when its sessions are created, with numpy alone (no torch, no re-export).

A LoRA layer adds ``scale * alpha / rank * up @ down`` to one Linear or Conv2d weight. Export fuses the same
deltas into the torch modules before tracing (``edgegen.export.lora``); for merging at load, the manifest's
``lora.targets`` says where each targetable weight lies in each form's shared weights file (offset, layout,
dtype), and the initializers of a component that point there are replaced when its graph opens (ONNX
Runtime: ``SessionOptions.add_external_initializers``; TensorRT: a refittable engine's Refitter). The
bundle's files never change: one bundle serves many LoRAs.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import BadBundleError, BadInputError
from .onnx_scan import external_initializers

PARTS = ("unet", "text_encoder")  # what a LoRA file may adapt
# How each naming spells a part: diffusers/PEFT "unet.<module>", kohya "lora_unet_<module with underscores>"
DOTTED = {"unet.": "unet", "text_encoder.": "text_encoder"}
KOHYA = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder"}
# (suffix, role): PEFT (lora_A/lora_B), diffusers' older layers, kohya, diffusers' attention processors
SUFFIXES = (
    (".lora_A.weight", "down"),
    (".lora_B.weight", "up"),
    (".lora.down.weight", "down"),
    (".lora.up.weight", "up"),
    (".lora_linear_layer.down.weight", "down"),
    (".lora_linear_layer.up.weight", "up"),
    (".lora_down.weight", "down"),
    (".lora_up.weight", "up"),
    ("_lora.down.weight", "down"),
    ("_lora.up.weight", "up"),
    (".alpha", "alpha"),
)
MAX_LISTED = 3  # unmatched keys named in an error
LORA_FORMS = ("fp32", "fp16")  # the forms whose weights a LoRA is merged into


@dataclass
class LoraLayer:
    """One targeted weight's low-rank pair."""

    part: str
    module: str
    down: np.ndarray | None = None  # (rank, in[, kh, kw])
    up: np.ndarray | None = None  # (out, rank[, 1, 1])
    alpha: float | None = None  # None: the rank (a factor of 1), as diffusers reads a file without alphas
    rslora: bool = False  # PEFT's rank-stabilised factor alpha / sqrt(rank)

    def delta(self, scale: float) -> np.ndarray:
        """``scale * alpha / rank * up @ down`` in float32, shaped like the target weight (torch layout)."""
        rank = self.down.shape[0]
        alpha = rank if self.alpha is None else self.alpha
        factor = scale * alpha / (np.sqrt(rank) if self.rslora else rank)
        product = self.up.reshape(self.up.shape[0], -1).astype(np.float32) @ self.down.reshape(
            rank, -1
        ).astype(np.float32)
        return (np.float32(factor) * product).reshape(self.up.shape[0], *self.down.shape[1:])


@dataclass(frozen=True)
class LoraFile:
    path: Path
    scale: float
    sha256: str
    layers: list[LoraLayer] = field(hash=False)

    def record(self) -> dict:
        """What a manifest says about it."""
        return {"file": self.path.name, "sha256": self.sha256, "scale": self.scale}


def parse_spec(text: str) -> tuple[str, float]:
    """``FILE[:SCALE]`` (the CLI's --lora) -> (file, scale); a drive letter's colon is part of the file."""
    head, sep, tail = text.rpartition(":")
    if sep and head and re.fullmatch(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?", tail.strip()):
        return head, float(tail)
    return text, 1.0


def normalize(loras) -> list[tuple[Path, float]]:
    """``[(file, scale), ...]`` (or ``[file, ...]``, scale 1) checked: files that exist, finite scales."""
    if isinstance(loras, (str, os.PathLike)):
        loras = [loras]
    out = []
    for item in loras:
        if isinstance(item, (str, os.PathLike)):
            item = (item, 1.0)
        if not (
            isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], (str, os.PathLike))
        ):
            raise BadInputError(
                "lora", f"{item!r} is not a file or a (file, scale) pair", "lora=[(file, 0.8)]"
            )
        path, scale = item
        try:
            scale = float(scale)
        except (TypeError, ValueError):
            scale = float("nan")
        if not np.isfinite(scale):
            raise BadInputError(f"LoRA {path}", f"scale {item!r} is not a finite number", "e.g. 0.8")
        if not Path(path).is_file():
            raise BadInputError(f"LoRA {path}", "no such file", "pass the path of a .safetensors LoRA file")
        out.append((Path(path), scale))
    return out


# safetensors read with numpy alone: the lean runtime has no safetensors/torch dependency, and numpy has no
# bfloat16, in which many LoRAs are saved (widened to float32 here: its bits are float32's upper half).
_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "BF16": np.uint16}


def _not_safetensors(path: Path, why) -> BadInputError:
    return BadInputError(
        f"LoRA {path}", f"not a readable safetensors file ({why})", "LoRAs are read from .safetensors files"
    )


def _read_bytes(path: Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise _not_safetensors(path, e) from None


def read_safetensors(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(tensors, metadata) of a .safetensors file; BadInputError if it is not one."""
    return _parse_safetensors(_read_bytes(path), path)


def _parse_safetensors(data: bytes, path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(tensors, metadata) of the contents of the .safetensors file ``path``; the tensors are views of
    ``data`` (bf16 ones excepted: widened copies)."""
    bad = lambda why: _not_safetensors(path, why)  # noqa: E731
    try:
        (size,) = struct.unpack_from("<Q", data, 0)
        header = json.loads(data[8 : 8 + size])
    except (struct.error, ValueError) as e:
        raise bad(e) from None
    if not isinstance(header, dict):
        raise bad("its header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    tensors, base = {}, 8 + size
    for key, entry in header.items():
        try:
            dtype = _DTYPES[entry["dtype"]]
            start, end = (base + int(o) for o in entry["data_offsets"])
            shape = [int(d) for d in entry["shape"]]
            if not base <= start <= end <= len(data):
                raise ValueError("data offsets outside the file")
            count = (end - start) // np.dtype(dtype).itemsize
            array = np.frombuffer(data, dtype, count, start).reshape(shape)
        except KeyError:
            raise bad(f"tensor {key!r} has dtype {entry.get('dtype')!r}: expected F32, F16 or BF16") from None
        except (TypeError, ValueError) as e:
            raise bad(f"tensor {key!r}: {e}") from None
        if entry["dtype"] == "BF16":
            array = (array.astype(np.uint32) << 16).view(np.float32)
        tensors[key] = array
    return tensors, metadata


def _split_key(
    key: str, modules: dict[str, set[str]], kohya_names: dict[str, dict[str, str]]
) -> tuple[str, str, str] | None:
    """A LoRA key -> (part, module, role), or None if it names nothing in ``modules``. ``kohya_names``: per
    part, each module by its kohya spelling (dots as underscores)."""
    suffix, role = next(((s, r) for s, r in SUFFIXES if key.endswith(s)), (None, None))
    if suffix is None:
        return None
    stem = key[: -len(suffix)]
    for prefix, part in DOTTED.items():
        if stem.startswith(prefix):
            module = stem[len(prefix) :]
            if suffix.startswith("_lora."):  # attention processors: attn1.processor.to_out_lora
                module = module.replace(".processor.", ".")
                module = module + ".0" if module.endswith(".to_out") else module
            return (part, module, role) if module in modules.get(part, ()) else None
    for prefix, part in KOHYA.items():
        if stem.startswith(prefix):
            module = kohya_names.get(part, {}).get(stem[len(prefix) :])
            return (part, module, role) if module else None
    return None


def _alphas(metadata: dict[str, str], path: Path) -> dict[str, tuple[float | None, bool]]:
    """Per part: (lora_alpha, use_rslora) from the adapter metadata diffusers writes, if any."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        config = json.loads(raw)
    except ValueError:
        raise BadInputError(f"LoRA {path}", "its lora_adapter_metadata is not JSON", "re-save it") from None
    out = {}
    for part in PARTS:
        if config.get(f"{part}.use_dora"):
            raise BadInputError(f"LoRA {path}", "is a DoRA (use_dora)", "edgegen merges plain LoRAs only")
        if config.get(f"{part}.alpha_pattern"):
            raise BadInputError(
                f"LoRA {path}",
                "sets per-module alphas (alpha_pattern), which edgegen does not read",
                "fuse it with diffusers and export the fused model",
            )
        alpha = config.get(f"{part}.lora_alpha")
        out[part] = (None if alpha is None else float(alpha), bool(config.get(f"{part}.use_rslora")))
    return out


def read_lora(path: Path, scale: float, modules: dict[str, set[str]]) -> LoraFile:
    """The layers of one LoRA file, each matched to a module of ``modules`` (part -> module names). Refuses a
    file with keys that match nothing, naming the first of them."""
    data = _read_bytes(path)
    tensors, metadata = _parse_safetensors(data, path)
    layers: dict[tuple[str, str], LoraLayer] = {}
    unmatched = []
    kohya_names = {part: {m.replace(".", "_"): m for m in names} for part, names in modules.items()}
    for key in sorted(tensors):
        found = _split_key(key, modules, kohya_names)
        if found is None:
            unmatched.append(key)
            continue
        part, module, role = found
        layer = layers.setdefault((part, module), LoraLayer(part, module))
        value = tensors[key]
        if role == "alpha":
            layer.alpha = float(value.reshape(-1)[0])
        else:
            setattr(layer, role, value)
    if unmatched or not layers:
        shown = ", ".join(unmatched[:MAX_LISTED]) + (" ..." if len(unmatched) > MAX_LISTED else "")
        raise BadInputError(
            f"LoRA {path}",
            f"{len(unmatched)} of its {len(tensors)} keys match no weight of this model: {shown}"
            if unmatched
            else "holds no LoRA weights",
            "use a LoRA made for this model (diffusers/PEFT or kohya naming, UNet and text encoder only)",
        )
    alphas = _alphas(metadata, path)
    for layer in layers.values():
        if layer.down is None or layer.up is None:
            raise BadInputError(
                f"LoRA {path}", f"{layer.part} {layer.module} lacks its up or down weight", "re-save it"
            )
        if layer.up.shape[1] != layer.down.shape[0]:
            raise BadInputError(
                f"LoRA {path}",
                f"{layer.part} {layer.module}: up {list(layer.up.shape)} does not fit down "
                f"{list(layer.down.shape)}",
                "re-save it",
            )
        if layer.alpha is None and layer.part in alphas:
            layer.alpha, layer.rslora = alphas[layer.part]
    return LoraFile(Path(path), float(scale), hashlib.sha256(data).hexdigest(), list(layers.values()))


def check_shape(lora: LoraFile, layer: LoraLayer, shape) -> None:
    expected = (layer.up.shape[0], *layer.down.shape[1:])
    if int(np.prod(expected)) != int(np.prod(shape)) or expected[0] != shape[0]:
        raise BadInputError(
            f"LoRA {lora.path}",
            f"{layer.part} {layer.module}: its delta is {list(expected)}, the weight {list(shape)}",
            "use a LoRA made for this model",
        )


def _targets(bundle) -> dict:
    """The manifest's ``lora.targets`` (part -> module -> target); BadInputError if it records none."""
    targets = bundle.manifest.get("lora", {}).get("targets")
    if not targets:
        raise BadInputError(
            "lora",
            f"bundle {bundle.root} records no LoRA targets",
            "re-export it with this edgegen (diffusion bundles record them)",
        )
    return targets


def read_loras(bundle, loras) -> list[LoraFile]:
    """``loras`` (``[(file, scale), ...]``, as ``normalize`` takes them) read and matched to the weights the
    bundle records as LoRA targets. Files already read (a list of LoraFile) are returned as they are:
    ``Pipeline.from_bundle`` reads them once for every backend ``auto`` tries."""
    if isinstance(loras, (list, tuple)) and loras and all(isinstance(f, LoraFile) for f in loras):
        return list(loras)
    modules = {part: set(found) for part, found in _targets(bundle).items()}
    return [read_lora(path, scale, modules) for path, scale in normalize(loras)]


@dataclass(frozen=True)
class Overrides:
    """Initializers that replace a graph's own when its session is created; ``key`` names the LoRAs and
    scales they come from (caches of compiled graphs, such as ONNX Runtime's TensorRT engines, use it)."""

    key: str
    arrays: dict[str, np.ndarray]


class LoraMerge:
    """LoRAs merged into one form of a bundle: the new contents of the shared weights file's tensors they
    touch (by offset), and, per component, the initializers that point there."""

    def __init__(self, bundle, form: str, loras):
        """``loras``: ``[(file, scale), ...]``, or those files already read (``read_loras``)."""
        targets = _targets(bundle)
        if form not in LORA_FORMS:
            raise BadInputError(
                "lora", f"the {form} form cannot take a LoRA at load", "load the fp32 or fp16 precision"
            )
        self.bundle, self.form = bundle, form
        self.files = read_loras(bundle, loras)
        self.key = hashlib.sha256(
            json.dumps([f.record() for f in self.files], sort_keys=True).encode()
        ).hexdigest()[:16]
        self.merged = self._merge(targets)

    def _merge(self, targets) -> dict[int, np.ndarray]:
        deltas: dict[tuple[str, str], np.ndarray] = {}
        for lora in self.files:
            for layer in lora.layers:
                target = targets[layer.part][layer.module]
                check_shape(lora, layer, target["shape"])
                if self.form not in target["forms"]:
                    raise BadInputError(
                        f"LoRA {lora.path}",
                        f"{layer.part} {layer.module} is not stored as a plain weight in the {self.form} "
                        "graphs (export rewrote or shared it)",
                        "export with --lora to fuse this LoRA before tracing",
                    )
                delta = layer.delta(lora.scale).reshape(target["shape"])
                key = (layer.part, layer.module)
                deltas[key] = deltas[key] + delta if key in deltas else delta
        blob = np.memmap(self.bundle.path(f"onnx/weights.{self.form}.bin"), np.uint8, mode="r")
        merged = {}
        for (part, module), delta in deltas.items():
            for place in targets[part][module]["forms"][self.form]:
                dtype, offset = np.dtype(place["dtype"]), int(place["offset"])
                base = np.frombuffer(blob, dtype, delta.size, offset)
                change = delta if place["layout"] == "oi" else delta.reshape(delta.shape[0], -1).T
                merged[offset] = (base.astype(np.float32).reshape(change.shape) + change).astype(dtype)
        return merged

    def overrides(self, component: str) -> Overrides | None:
        """The merged tensors that ``component``'s graph in this form reads, by initializer name; None where
        it reads none (the VAE): its graph opens as without a LoRA (no refit, no LoRA-keyed engine cache)."""
        found = _stored_at(self.bundle, component, self.form, set(self.merged))
        if not found:
            return None
        return Overrides(self.key, {name: self.merged[w.offset].reshape(w.dims) for name, w in found.items()})


def _stored_at(bundle, component: str, form: str, offsets: set[int]) -> dict:
    """The initializers of ``component``'s graph in ``form`` whose data lies at one of ``offsets`` of the
    form's shared weights file, by name."""
    path = bundle.onnx_path(component, form)
    try:
        found = external_initializers(path.read_bytes())
    except ValueError as e:
        raise BadBundleError(f"bundle file {path}", f"unreadable ONNX file ({e})", "re-export") from None
    blob = f"weights.{form}.bin"
    return {name: w for name, w in found.items() if w.location == blob and w.offset in offsets}


def target_initializers(bundle, component: str, form: str) -> list[str]:
    """The initializers of a component's graph that a LoRA may replace (what refittable engines mark)."""
    targets = bundle.manifest.get("lora", {}).get("targets") or {}
    offsets = {
        int(place["offset"])
        for modules in targets.values()
        for target in modules.values()
        for place in target["forms"].get(form, [])
    }
    return sorted(_stored_at(bundle, component, form, offsets)) if offsets else []
