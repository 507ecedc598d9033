"""The gan family: a Hugging Face text encoder + edgegen's conditional generator."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from edgegen.runtime.bundle import SEQUENCE_AXIS, OutputRef, TensorSpec
from edgegen.runtime.errors import CheckpointError
from edgegen.runtime.pipeline import noise_for_seeds
from edgegen.runtime.reading import WORD
from safetensors.torch import load_file
from torch import nn

from ..generator import ConditionalGenerator, GeneratorConfig, GeneratorWithReading
from ..text_encoders import load_text_encoder, tokenizer_settings
from . import ComponentDef, Family

# Short and long prompts, several batch sizes: what every gan export is validated on.
VALIDATION_PROMPTS = [
    ["a red apple"],
    ["a rocket on a blue background", "cat", "a very small yellow star on a dark green background, centered"],
]
VALIDATION_SEEDS = [[0], [1, 2, 3]]
# INT8 calibration: prompts of the kind users type, each with its own seed (never the validation ones).
CALIBRATION_PROMPTS = [
    f"a {size}{color} {thing}{where}"
    for size, color, thing, where in zip(
        ["", "small ", "large ", "tiny ", "big ", ""] * 6,
        ["red", "blue", "green", "yellow", "purple", "orange", "pink", "black"] * 4
        + ["white", "gray", "brown", "cyan"],
        ["apple", "rocket", "cat", "dog", "star", "moon", "house", "car", "tree", "flower", "heart", "face"]
        * 3,
        ["", " on a white background", " on a dark background", ", centered", " on a blue background", ""]
        * 6,
    )
]
# Shipped beside a judge: what the runtime needs to score images on the device (runtime/quality.py).
QUALITY_FILES = {
    "labels": "labels.json",
    "eval_prompts": "eval_prompts.json",
    "real_features": "real_features.npz",
}


def reading_names(generator: ConditionalGenerator) -> list[str]:
    """What each concept memory reads, by name: emoji64's three are the subject (emoji), the background
    and the size; another count is numbered."""
    n = len(generator.memories)
    return ["subject", "background", "size"] if n == 3 else [f"concept{i}" for i in range(n)]


class FusedGan(nn.Module):
    """Token ids + mask + noise -> uint8 HWC pixels (and the text states, so the runtime can cache them,
    then the probabilities each concept memory read, so it can say what it drew)."""

    def __init__(self, text_encoder: nn.Module, generator: nn.Module):
        super().__init__()
        self.text_encoder, self.generator = text_encoder, generator

    def forward(self, input_ids, attention_mask, noise):
        states = self.text_encoder(input_ids, attention_mask)
        image, probs = self.generator.draw(noise, states, attention_mask)
        # Cast last: TensorRT takes uint8 only as a network input/output, never as an intermediate tensor.
        pixels = ((image + 1.0) * 127.5).clamp(0.0, 255.0).round().permute(0, 2, 3, 1).to(torch.uint8)
        return (pixels, states, *probs)


def load_generator(path: Path) -> ConditionalGenerator:
    path = Path(path)
    weights = path / "model.safetensors"
    if not (path / "config.json").is_file():
        raise CheckpointError(
            f"generator {path}",
            "no config.json",
            "a gan checkpoint's generator/ holds config.json + model.safetensors",
        )
    if not weights.is_file():
        found = sorted(p.name for p in path.iterdir())
        raise CheckpointError(
            f"generator {path}",
            f"no model.safetensors (found {found})",
            "edgegen loads safetensors only, never pickles: save with safetensors.torch.save_file",
        )
    try:
        config = GeneratorConfig.load(path / "config.json")
    except (ValueError, TypeError) as e:
        raise CheckpointError(
            f"generator {path / 'config.json'}", f"invalid: {e}", "fix the generator config"
        ) from None
    model = ConditionalGenerator(config)
    try:
        model.load_state_dict(load_file(weights))
    except RuntimeError as e:
        raise CheckpointError(
            f"generator {weights}",
            f"weights do not fit the config: {str(e).splitlines()[0]}",
            "the config.json and model.safetensors must come from the same model",
        ) from None
    return model.eval()


def load_judge(path: Path):
    from .. import judge

    if not (path / "model.safetensors").is_file():
        raise CheckpointError(
            f"judge {path}", "no model.safetensors", "the judge ships as config.json + model.safetensors"
        )
    return judge.load_judge(path)


class GanFamily(Family):
    name = "gan"

    @classmethod
    def matches(cls, checkpoint: Path) -> bool:
        return (checkpoint / "generator" / "config.json").is_file() and (checkpoint / "text_encoder").is_dir()

    def __init__(self, checkpoint: Path):
        self.checkpoint = Path(checkpoint)
        self.text_encoder, self.hf_tokenizer = load_text_encoder(self.checkpoint / "text_encoder")
        self.generator = load_generator(self.checkpoint / "generator")
        self.config = self.generator.config
        if self.text_encoder.hidden_size != self.config.text_dim:
            raise CheckpointError(
                f"checkpoint {self.checkpoint}",
                f"text encoder width {self.text_encoder.hidden_size} "
                f"!= generator text_dim {self.config.text_dim}",
                "the generator was trained for another text encoder",
            )
        self.fused = FusedGan(self.text_encoder, self.generator).eval()
        self.judge = load_judge(self.checkpoint / "judge") if (self.checkpoint / "judge").is_dir() else None
        self.quality_dir = self.checkpoint / "quality" if self.judge is not None else None

    # --- what goes in the manifest ---
    def tokenizer_json(self) -> str:
        return self.hf_tokenizer.backend_tokenizer.to_str()

    def tokenizer_settings(self) -> dict:
        return tokenizer_settings(self.hf_tokenizer, self.config.max_length, padding="dynamic")

    def generation(self, max_batch: int) -> dict:
        return {
            "image_size": self.config.image_size,
            "noise_shape": [self.config.noise_dim],
            "max_batch": max_batch,
            "noise": "per image: numpy default_rng(seed).standard_normal(noise_shape, float32)",
        }

    def extra_files(self) -> dict[str, Path]:
        if self.quality_dir is None:
            return {}
        return {f"quality/{name}": self.quality_dir / name for name in QUALITY_FILES.values()}

    def manifest_extras(self) -> dict:
        extras = {"reading": self.reading()} if self.generator.memories else {}
        if self.quality_dir is not None:
            extras["quality"] = {key: f"quality/{name}" for key, name in QUALITY_FILES.items()}
        return extras

    def reading(self) -> dict:
        """The manifest's ``reading``: for each concept memory, the graph output holding its probabilities
        and the names of its concepts (from the shipped labels.json; indices where none ships)."""
        labels, vocabulary = {}, []
        if self.quality_dir is not None and (self.quality_dir / QUALITY_FILES["labels"]).is_file():
            data = json.loads((self.quality_dir / QUALITY_FILES["labels"]).read_text())
            labels = {
                "subject": [e["name"] for e in data["emoji"]],
                "background": [b["name"] for b in data["backgrounds"]],
                "size": ["not said"] + [s["name"] for s in data["sizes"]],
            }
            names = [n for e in data["emoji"] for n in [e["name"], *e["synonyms"]]]
            names += labels["background"] + [w for s in data["sizes"] for w in s["words"]]
            words = {w for n in names for w in WORD.findall(n)}  # split as the runtime splits prompts
            vocabulary = sorted(words | set(data.get("caption_words", [])))
        spec = {
            name: {
                "output": f"{name}_probs",
                "labels": labels.get(name) or [str(i) for i in range(len(m.values))],
            }
            for name, m in zip(reading_names(self.generator), self.generator.memories)
        }
        return {**spec, "vocabulary": vocabulary} if vocabulary else spec

    def describe(self) -> dict:
        return {"text_encoder": self.text_encoder.kind, "generator": self.config.__dict__}

    def reference_outputs(self) -> dict[str, OutputRef]:
        # a call runs the fused graph (a cached prompt: the generator on the same states)
        return {"pixels": OutputRef("fused", "pixels"), "text_states": OutputRef("fused", "text_states")}

    def validation_prompts(self) -> list[str]:
        return [p for group in VALIDATION_PROMPTS for p in group]

    # --- what gets traced ---
    def components(self) -> list[ComponentDef]:
        # token axes are dynamic: padding costs compute, so the CPU runtime runs each prompt at its length
        c, L = self.config, SEQUENCE_AXIS
        ids = TensorSpec("input_ids", "int64", ("batch", L))
        mask = TensorSpec("attention_mask", "int64", ("batch", L))
        noise = TensorSpec("noise", "float32", ("batch", c.noise_dim))
        states = TensorSpec("text_states", "float32", ("batch", L, c.text_dim))
        image = TensorSpec("image", "float32", ("batch", 3, c.image_size, c.image_size))
        pixels = TensorSpec("pixels", "uint8", ("batch", c.image_size, c.image_size, 3))
        # what each concept memory read (its probabilities over its concepts): the runtime reports it
        reads = [
            TensorSpec(f"{name}_probs", "float32", ("batch", len(m.values)))
            for name, m in zip(reading_names(self.generator), self.generator.memories)
        ]
        read_tol = {r.name: 1e-3 for r in reads}
        comps = [
            ComponentDef("text_encoder", self.text_encoder, [ids, mask], [states], {"text_states": 1e-3}),
            ComponentDef(
                "generator",
                GeneratorWithReading(self.generator) if reads else self.generator,
                [noise, states, mask],
                [image, *reads],
                {"image": 1e-3, **read_tol},
            ),
            ComponentDef(
                "fused",
                self.fused,
                [ids, mask, noise],
                [pixels, states, *reads],
                {"pixels": 1.0, "text_states": 1e-3, **read_tol},
            ),
        ]
        if self.judge is not None:
            outs = [
                TensorSpec("emoji_logits", "float32", ("batch", self.judge.config.n_emoji)),
                TensorSpec("background_logits", "float32", ("batch", self.judge.config.n_backgrounds)),
                TensorSpec("features", "float32", ("batch", self.judge.config.feature_dim)),
            ]
            comps.append(
                ComponentDef("judge", self.judge, [image], outs, {o.name: 1e-3 for o in outs}, quantize=False)
            )
        return comps

    def calibration_cases(self, tokenize):
        groups = [CALIBRATION_PROMPTS[i : i + 8] for i in range(0, len(CALIBRATION_PROMPTS), 8)]
        return self.reference_cases(
            tokenize, groups, [[10_000 + 8 * g + i for i in range(len(p))] for g, p in enumerate(groups)]
        )

    @torch.no_grad()
    def reference_cases(self, tokenize, groups=VALIDATION_PROMPTS, seeds_per_group=VALIDATION_SEEDS):
        cases = []
        for prompts, seeds in zip(groups, seeds_per_group):
            tokens = tokenize(prompts)
            noise = noise_for_seeds(seeds, (self.config.noise_dim,))
            states = self.text_encoder(
                torch.from_numpy(tokens.input_ids), torch.from_numpy(tokens.attention_mask)
            )
            image = self.generator(torch.from_numpy(noise), states, torch.from_numpy(tokens.attention_mask))
            cases.append(
                (
                    {
                        "input_ids": tokens.input_ids,
                        "attention_mask": tokens.attention_mask,
                        "noise": noise,
                        "text_states": states.numpy(),
                        "image": image.numpy(),
                    },
                    {"prompts": np.array(prompts), "seeds": np.array(seeds, dtype=np.uint64)},
                )
            )
        return cases
