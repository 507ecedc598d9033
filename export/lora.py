"""LoRA at export: fuse LoRA files into the torch modules before tracing, and record where each weight a
LoRA can target lies in the bundle's shared weights files, so the runtime can merge LoRAs at load
(``edgegen.runtime.lora``)."""

from __future__ import annotations

import numpy as np
import torch
from edgegen.runtime.lora import check_shape, normalize, read_lora
from onnx import TensorProto
from torch import nn

from .fp16 import weight_to_fp16
from .weights import content_key

TARGETS = (nn.Linear, nn.Conv2d)  # what LoRAs adapt (diffusers' LoRA-compatible layers subclass these)


def target_modules(parts: dict[str, nn.Module]) -> dict[str, dict[str, nn.Module]]:
    """Per part, its Linear and Conv2d modules by name."""
    return {
        part: {name: m for name, m in module.named_modules() if isinstance(m, TARGETS) and name}
        for part, module in parts.items()
    }


@torch.no_grad()
def fuse_loras(loras, parts: dict[str, nn.Module]) -> list[dict]:
    """Add each LoRA's ``scale * alpha / rank * up @ down`` to the weights of ``parts`` (part name ->
    module); returns the manifest's records of them. Refuses a LoRA whose keys do not match."""
    modules = target_modules(parts)
    names = {part: set(found) for part, found in modules.items()}
    files = [read_lora(path, scale, names) for path, scale in normalize(loras)]
    for lora in files:  # every file checked before any weight changes
        for layer in lora.layers:
            check_shape(lora, layer, tuple(modules[layer.part][layer.module].weight.shape))
    for lora in files:
        for layer in lora.layers:
            weight = modules[layer.part][layer.module].weight
            weight += torch.from_numpy(layer.delta(lora.scale)).reshape(weight.shape).to(weight.dtype)
    return [lora.record() for lora in files]


def _key(array: np.ndarray) -> str:
    code = TensorProto.FLOAT16 if array.dtype == np.float16 else TensorProto.FLOAT
    return content_key(np.ascontiguousarray(array).tobytes(), code)


class TargetIndex:
    """The content keys of every targetable weight as a graph may store it: float32 or float16 (the fp16
    form), in torch's layout ("oi") or transposed ("io": exported Linear layers multiply by W^T).

    ``traced``: every module the graphs hold. Their other weights are keyed too, so that a target whose
    content another weight shares (a ControlNet made from the UNet starts as a copy of its blocks) is seen
    to be shared and left out: merging into it would change both."""

    def __init__(self, parts: dict[str, nn.Module], traced: list[nn.Module] = (), fp16: bool = True):
        self.fp16 = fp16  # key the float16 casts too (only when an fp16 form is exported: hashing costs)
        self.shapes: dict[tuple[str, str], list[int]] = {}
        self.keys: dict[str, list[tuple[str, str, str, str]]] = {}  # key -> [(part, module, layout, dtype)]
        own = set()
        for part, found in target_modules(parts).items():
            for name, module in found.items():
                self.shapes[(part, name)] = list(module.weight.shape)
                self._add(module.weight, (part, name))
                own.add(id(module.weight))
        for module in traced:
            for name, weight in module.named_parameters():
                if id(weight) not in own and weight.ndim >= 2:
                    own.add(id(weight))
                    self._add(weight, ("", name))  # an owner that is no target

    def _add(self, weight, owner: tuple[str, str]) -> None:
        w = weight.detach().float().numpy()
        casts = [("float32", w)]
        if self.fp16:
            casts.append(("float16", weight_to_fp16(w)))
        for dtype, cast in casts:
            for layout, array in (("oi", cast), ("io", cast.T if cast.ndim == 2 else None)):
                if array is not None:
                    self.keys.setdefault(_key(array), []).append((*owner, layout, dtype))

    @property
    def target_keys(self) -> frozenset[str]:
        """The content keys a target's weight may be stored under: what the shared weights files must hold
        however small (a non-target weight's key is kept only to see a target sharing its content)."""
        return frozenset(key for key, owners in self.keys.items() if any(part for part, *_ in owners))

    def targets(self, offsets: dict[str, dict[str, tuple[int, int]]]) -> dict:
        """The manifest's ``lora.targets`` from each form's shared-file offsets (form -> key -> (offset,
        length)): part -> module -> {shape, forms: {form: [{offset, layout, dtype}, ...]}}. A tensor whose
        content several weights share (or a symmetric one) cannot be merged alone and is left out."""
        out: dict[str, dict] = {}
        for (part, module), shape in self.shapes.items():
            out.setdefault(part, {})[module] = {"shape": shape, "forms": {}}
        for form, placed in offsets.items():
            for key, (offset, _) in placed.items():
                owners = self.keys.get(key, [])
                if len(owners) != 1:
                    continue
                part, module, layout, dtype = owners[0]
                if not part:
                    continue
                out[part][module]["forms"].setdefault(form, []).append(
                    {"offset": offset, "layout": layout, "dtype": dtype}
                )
        return out
