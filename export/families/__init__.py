"""Model families: each knows how to load a checkpoint and describe its components for export."""

from __future__ import annotations

import contextlib
import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from edgegen.runtime.bundle import OutputRef, TensorSpec
from edgegen.runtime.errors import BadInputError, CheckpointError
from torch import nn

FAMILIES: dict[str, type[Family]] = {}


@dataclass
class ComponentDef:
    """A torch module to trace, with the names, dtypes and shapes of its inputs and outputs."""

    name: str
    module: nn.Module
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    tolerance: dict[str, float] = field(default_factory=dict)  # fp32 max-abs per output vs PyTorch
    quantize: bool = True  # False: kept in fp32 in every precision (e.g. the judge, a measuring instrument)
    # Built from the already exported components' files instead of traced from ``module`` (which still gives
    # the PyTorch reference): assemble({component: fp32 path}, output path).
    assemble: Callable[[dict[str, Path], Path], None] | None = None


class Family:
    """A model family: everything the exporter and the checks ask of a checkpoint, declared once.

    Subclasses register themselves by ``name``. The exporter is generic over these members and never
    names a family's components or outputs: ``reference_outputs`` says which ones the quality gates and
    the whole-call parity check read.
    """

    name = ""
    options: tuple[str, ...] = ()  # keyword options the family's constructor takes (e.g. image_size)
    hf_tokenizer = None
    """The checkpoint's transformers tokenizer (set by the constructor): the runtime's tokenizer, built from
    ``tokenizer_json``, must give the same ids for the same prompts (checked at export)."""

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        if cls.name:
            FAMILIES[cls.name] = cls

    @classmethod
    def matches(cls, checkpoint: Path) -> bool:
        """Whether ``checkpoint`` (a directory) is of this family: a cheap look at its files, no loading."""
        raise NotImplementedError

    # --- what goes in the manifest ---
    def tokenizer_json(self) -> str:
        """The fast tokenizer (`tokenizers` library JSON) the runtime tokenizes with."""
        raise NotImplementedError

    def tokenizer_settings(self) -> dict:
        """The manifest's ``tokenizer`` entry: file, max_length, padding, pad id and token."""
        raise NotImplementedError

    def generation(self, max_batch: int) -> dict:
        """The manifest's ``generation`` entry: image size, noise shapes and draws, call defaults."""
        raise NotImplementedError

    def describe(self) -> dict:
        """The manifest's ``model`` entry: the architecture, for people reading the manifest."""
        raise NotImplementedError

    def extra_files(self) -> dict[str, Path]:
        """Files copied into the bundle as they are: {path in bundle: source}."""
        return {}

    def lora_parts(self) -> dict:
        """The modules LoRAs adapt, by the part name LoRA files use ("unet", "text_encoder"): export records
        where their weights lie, so the runtime can merge LoRAs at load. {}: the family takes no LoRA."""
        return {}

    loras_fused: list[dict] = []  # LoRAs fused into the weights at export (file, sha256, scale)

    def manifest_extras(self) -> dict:
        """Further top-level manifest entries the family's runtime reads (e.g. the gan's ``quality``)."""
        return {}

    def reference_outputs(self) -> dict[str, OutputRef]:
        """The manifest's ``reference_outputs``: the component output that stands for ``"pixels"`` (what a
        call with the bundle's default options returns for a reference case's prompts and seeds; the int8
        layer scan quantizes and scores that component's graph) and ``"text_states"`` (the text conditioning
        the quality gates score, pooled over the attention mask)."""
        raise NotImplementedError

    # --- what gets traced and validated ---
    def check_precisions(self, precisions: list[str]) -> None:
        """Refuse (BadInputError) precisions this family cannot export."""

    def components(self) -> list[ComponentDef]:
        """The graphs to export, in order (an ``assemble``d one after those it is built from)."""
        raise NotImplementedError

    def tracing(self):
        """Context in which components are traced: a family may swap in equivalent, faster layers here;
        the PyTorch reference (computed before) stays the original model's."""
        return contextlib.nullcontext()

    def validation_prompts(self) -> list[str]:
        """Every prompt of ``reference_cases``, flat: the tokenizer agreement check runs on them."""
        raise NotImplementedError

    def reference_cases(self, tokenize) -> list[tuple[dict[str, np.ndarray], dict]]:
        """(inputs, meta) per case: inputs for every component (several batch sizes and prompt lengths,
        PyTorch-computed intermediates included) and the prompts and seeds they came from."""
        raise NotImplementedError

    def calibration_cases(self, tokenize) -> list[tuple[dict[str, np.ndarray], dict]]:
        """Like ``reference_cases`` but on other prompts and seeds: the INT8 calibration feeds. Needed only by
        families that export int8 (``check_precisions`` refuses int8 for the others)."""
        raise NotImplementedError


def _register_all() -> None:
    """Import every module of this package: each family registers itself by subclassing Family."""
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")


def load_family(checkpoint: Path, **options) -> Family:
    """The family that matches ``checkpoint``, loaded; ``options`` (None values ignored) go to its
    constructor."""
    _register_all()
    checkpoint = Path(checkpoint)
    options = {k: v for k, v in options.items() if v is not None}
    if not checkpoint.is_dir():
        raise CheckpointError(
            f"checkpoint {checkpoint}",
            "not a directory",
            "pass a gan checkpoint (text_encoder/ + generator/) or a diffusers pipeline directory",
        )
    for family in FAMILIES.values():
        if family.matches(checkpoint):
            unknown = sorted(set(options) - set(family.options))
            if unknown:
                raise BadInputError(
                    f"checkpoint {checkpoint}",
                    f"the {family.name} family takes no option {', '.join(unknown)}",
                    f"its options: {', '.join(family.options) or 'none'}",
                )
            return family(checkpoint, **options)
    raise CheckpointError(
        f"checkpoint {checkpoint}",
        "is of no known family",
        "a gan checkpoint has text_encoder/ and generator/config.json; "
        "a diffusion checkpoint has model_index.json",
    )
