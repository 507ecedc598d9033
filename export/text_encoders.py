"""Hugging Face text encoders (BERT/MiniLM, CLIP text, T5 encoder, GPT-2) as (ids, mask) -> hidden states."""

from __future__ import annotations

import warnings
from pathlib import Path

from edgegen.runtime.errors import CheckpointError
from torch import nn


class TextEncoder(nn.Module):
    """The encoder's last hidden states for every token position: (B, L) ids + mask -> (B, L, D)."""

    def __init__(self, model: nn.Module, kind: str):
        super().__init__()
        self.model = model
        self.kind = kind

    @property
    def hidden_size(self) -> int:
        cfg = self.model.config
        return int(getattr(cfg, "hidden_size", None) or getattr(cfg, "d_model", None) or cfg.n_embd)

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def _model_class(model_type: str):
    import transformers as tf

    if model_type == "t5":
        return tf.T5EncoderModel
    if model_type in ("clip", "clip_text_model"):
        return tf.CLIPTextModel
    return tf.AutoModel


def load_text_encoder(path: Path) -> tuple[TextEncoder, object]:
    """Load model (safetensors only, eager attention for a clean trace) and its fast tokenizer."""
    import transformers as tf

    path = Path(path)
    if not (path / "config.json").is_file():
        raise CheckpointError(
            f"text encoder {path}", "no config.json", "save the encoder with save_pretrained()"
        )
    if not list(path.glob("*.safetensors")):
        pickles = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt*")]
        raise CheckpointError(
            f"text encoder {path}",
            f"no .safetensors weights (found {pickles or 'none'})",
            "edgegen loads safetensors only, never pickles: convert with "
            "model.save_pretrained(dir, safe_serialization=True)",
        )
    tf.utils.logging.disable_progress_bar()
    config = tf.AutoConfig.from_pretrained(path, local_files_only=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = _model_class(config.model_type).from_pretrained(
            path, local_files_only=True, use_safetensors=True, attn_implementation="eager"
        )
        tokenizer = tf.AutoTokenizer.from_pretrained(path, local_files_only=True, use_fast=True)
    if not getattr(tokenizer, "is_fast", False):
        raise CheckpointError(
            f"text encoder {path}",
            "has no fast tokenizer (tokenizer.json)",
            "the runtime tokenizes with the `tokenizers` library; save a fast tokenizer",
        )
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = (
            tokenizer.eos_token
        )  # GPT-2 has no pad token; padded positions are masked anyway
    if tokenizer.pad_token_id is None:
        raise CheckpointError(
            f"text encoder {path}",
            "tokenizer has neither a pad nor an EOS token",
            "set tokenizer.pad_token and save it again",
        )
    return TextEncoder(model.eval(), config.model_type).eval(), tokenizer


def tokenizer_settings(tokenizer, max_length: int, padding: str = "max_length") -> dict:
    """What the runtime needs to tokenize as at export: right padding, truncation at ``max_length``.
    ``padding`` "max_length" (fixed-shape graphs) or "dynamic": the graphs have a dynamic sequence axis,
    so ONNX Runtime on the CPU pads to the batch's longest prompt and
    fixed-shape paths (TensorRT engines, CUDA graphs) pad to ``max_length``."""
    return {
        "file": "tokenizer.json",
        "max_length": int(max_length),
        "pad_id": int(tokenizer.pad_token_id),
        "pad_token": tokenizer.pad_token,
        "padding": padding,
        "padding_side": "right",
        "truncation": True,
    }
