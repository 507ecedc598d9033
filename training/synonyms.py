"""How far MiniLM carries a held-out synonym to its emoji: the ceiling the emoji lookup trains against.

    python -m training.synonyms [--steps 3000]

Two measurements, text only (no renderer, no judge):
1. Zero-shot: each held-out synonym alone ("kitten") against every emoji's training names alone ("cat",
   "kitty"), by the cosine of MiniLM's normalised mean states; right when the nearest name is its emoji's.
2. The emoji lookup (ConceptMemory, as the generator has it) trained alone with cross-entropy on the
   training captions' cached states, in several variants; accuracy on the eval prompts' splits.
If neither gets near 0.75 on held-out synonyms, the text encoder, not the generator, is the limit.
Deterministic on one thread; ~4 min once the text states are cached.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from edgegen.export.generator import ConceptMemory, masked_mean, normalise

from .dataset import binding_captions, binding_training_captions, eval_captions, kind, training_captions
from .emoji_set import EMOJI
from .text_states import cached_states, encode, load_minilm

VARIANTS = {  # name: ConceptMemory heads, weight decay, read noise, dropout, cosine keys
    "as shipped (2 heads)": (2, 0.0, 0.0, 0.0, False),
    "mean only (no heads)": (0, 0.0, 0.0, 0.0, False),
    "weight decay 0.1": (2, 0.1, 0.0, 0.0, False),
    "noise 0.05 on the reads": (2, 0.0, 0.05, 0.0, False),
    "dropout 0.3 on the reads": (2, 0.0, 0.0, 0.3, False),
    "cosine keys, learned scale": (2, 0.0, 0.0, 0.0, True),
}


def zero_shot() -> float:
    """Share of held-out synonyms whose nearest training name (alone, MiniLM mean) is their emoji's."""
    encoder, tokenizer = load_minilm()

    def embed(texts):
        states, mask = encode(encoder, tokenizer, texts, 32)
        return normalise(masked_mean(torch.from_numpy(states).float(), torch.from_numpy(mask))).numpy()

    names = [(n, e.id) for e in EMOJI for n in e.train_names]
    queries = [(n, e.id) for e in EMOJI for n in e.heldout_names]
    sim = embed([q for q, _ in queries]) @ embed([n for n, _ in names]).T
    best = np.full((len(queries), len(EMOJI)), -np.inf)
    for j, (_, owner) in enumerate(names):
        best[:, owner] = np.maximum(best[:, owner], sim[:, j])
    return float(np.mean(best.argmax(1) == np.array([e for _, e in queries])))


def lookup(variant, data, steps: int, seed: int = 0) -> dict:
    heads, decay, noise, dropout, cosine = variant
    states, mask, labels, ev_states, ev_mask, ev_labels, kinds = data
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    memory = ConceptMemory(states.shape[-1], len(EMOJI), 4, sharpness=8, heads=heads)
    scale = torch.nn.Parameter(torch.tensor(10.0))
    opt = torch.optim.AdamW([*memory.parameters(), scale], lr=1e-2, weight_decay=decay)

    def logits(s, m, train):
        read = memory.read(s, m)
        if train and noise:
            read = read + noise * torch.randn_like(read)
        if train and dropout:
            read = F.dropout(read, dropout)
        if cosine:
            return scale * F.linear(F.normalize(read, dim=-1), F.normalize(memory.keys.weight, dim=-1))
        return memory.keys(read)

    for _ in range(steps):
        idx = rng.integers(len(states), size=64)
        batch = torch.from_numpy(states[idx]).float(), torch.from_numpy(mask[idx])
        loss = F.cross_entropy(logits(*batch, True), torch.from_numpy(labels[idx]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        right = logits(torch.from_numpy(ev_states).float(), torch.from_numpy(ev_mask), False).argmax(-1)
    right = right.numpy() == ev_labels
    return {k: float(right[kinds == k].mean()) for k in ("seen", "template", "synonym", "binding")}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=3000, help="training steps of 64 captions per variant")
    p.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "edgegen-emoji64")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    result = {"zero_shot_heldout_synonyms": zero_shot()}
    print(f"zero-shot, held-out synonym alone vs training names alone: {result[next(iter(result))]:.3f}")
    captions = training_captions(6, seed=0) + binding_training_captions(2, seed=0)
    evals = eval_captions() + binding_captions()
    states, mask = cached_states([c.text for c in captions], 32, a.cache, log=lambda _: None)
    ev_states, ev_mask = cached_states([c.text for c in evals], 32, a.cache, log=lambda _: None)
    kinds = np.array([kind(c) for c in evals])
    data = (
        states,
        mask,
        np.array([c.emoji for c in captions]),
        ev_states,
        ev_mask,
        np.array([c.emoji for c in evals]),
        kinds,
    )
    for name, variant in VARIANTS.items():
        start = time.time()
        result[name] = acc = lookup(variant, data, a.steps)
        print(
            f"lookup, {name:28s} seen {acc['seen']:.3f} templates {acc['template']:.3f} "
            f"synonyms {acc['synonym']:.3f} binding {acc['binding']:.3f} ({time.time() - start:.0f} s)"
        )
    return result


if __name__ == "__main__":
    main()
