"""The subject memory's "known subject" head: how likely a prompt names any of the 320 emoji at all.

The lookup's softmax is over known subjects only, so a subject it never saw still reads with p near 1
("an astronaut" -> rocket, 1.00). After the generator is trained, a logistic head on the subject memory's
read (its token pools and mean, frozen), top logit and entropy learns known from unknown: positives are the
training captions, negatives the same training templates with the names of other emoji (Unicode names in
the emoji blocks, minus any name sharing a content word with a known subject or synonym, so "tiger face"
or "red apple" never count as unknown). A fifth of those names (by CRC32) is held out with held-out
templates for the figures. The reported subject probability is the softmax times the head's probability;
what is drawn does not change.

    python -m training.known --model export/emoji64       # fit, save into generator/, record metrics

Deterministic on one thread; about a minute once the text states are cached.
"""

from __future__ import annotations

import argparse
import json
import re
import unicodedata
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from edgegen.export.families.gan import load_generator
from edgegen.runtime.errors import CheckpointError
from edgegen.runtime.reading import SUBJECT_THRESHOLD
from safetensors.torch import save_file

from .dataset import (
    BG_NAMES,
    HELDOUT_TEMPLATES,
    SIZE_WORDS,
    TRAIN_TEMPLATES,
    binding_captions,
    binding_training_captions,
    caption,
    eval_captions,
    kind,
    template_has_size,
    training_captions,
)
from .emoji_set import CODEPOINTS, EMOJI
from .text_states import cached_states

BLOCKS = [(0x1F300, 0x1F5FF), (0x1F600, 0x1F64F), (0x1F680, 0x1F6FF), (0x1F900, 0x1F9FF), (0x1FA70, 0x1FAFF)]
BLOCKS += [(0x2600, 0x27BF)]
NOT_SUBJECTS = ("modifier", "regional", "tag ", "variation", "combining", "keycap", "clock face", "digit")
# words that do not make two names the same subject ("cat face" and "cat" do; "smiling face" and "cat face"
# do not)
GENERIC = set("face with of and the a in on sign symbol man woman person open closed heavy medium".split())
GENERIC |= set(BG_NAMES) | {"large", "small"}
STEPS, BATCH = 2000, 64


def unknown_names() -> tuple[list[str], list[str]]:
    """(training, held-out) names of emoji the model does not know, sorted."""
    known = {w for e in EMOJI for n in e.train_names + e.heldout_names for w in n.split()}
    names = set()
    for lo, hi in BLOCKS:
        for cp in range(lo, hi + 1):
            name = unicodedata.name(chr(cp), "").lower()
            if not name or cp in CODEPOINTS or len(name) > 30 or any(x in name for x in NOT_SUBJECTS):
                continue
            if not (set(re.findall(r"[a-z]+", name)) - GENERIC) & known:
                names.add(name)
    held = sorted(n for n in names if zlib.crc32(n.encode()) % 5 == 0)
    return sorted(names - set(held)), held


def unknown_captions(names: list[str], templates: list[str], per_name: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    out = []
    for name in names:
        for _ in range(per_name):
            template = templates[rng.integers(len(templates))]
            size = SIZE_WORDS[("small", "large")[rng.integers(2)]][rng.integers(2)]
            colour = BG_NAMES[rng.integers(len(BG_NAMES))]
            out.append(caption(template, name, colour, size if template_has_size(template) else ""))
    return out


@torch.no_grad()
def reads(memory, texts: list[str], cache: Path, max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(read, logits) of the subject memory for each text, in chunks."""
    states, mask = cached_states(texts, max_length, cache, log=lambda _: None)
    out = [
        memory.read(torch.from_numpy(states[i : i + 2048]).float(), torch.from_numpy(mask[i : i + 2048]))
        for i in range(0, len(texts), 2048)
    ]
    read = torch.cat(out)
    return read, memory.logits(read)


def fit(generator, cache: Path, seed: int = 0, log=print, known_texts: list[str] | None = None) -> dict:
    """Give the generator's subject memory a fitted ``known`` head (replacing any it had) and set its config's
    ``known_subject``; returns the figures (warning rates at the runtime's threshold, before and after, per
    split). ``known_texts``: the captions the generator trained on (default: the shipped recipe's)."""
    torch.manual_seed(seed)
    memory = generator.memories[0]
    memory.known = None  # "before": the softmax alone
    max_length = generator.config.max_length
    train_names, held_names = unknown_names()
    if known_texts is None:
        known_texts = [c.text for c in training_captions(6, seed=0) + binding_training_captions(2, seed=0)]
    pos = reads(memory, known_texts, cache, max_length)
    neg = reads(memory, unknown_captions(train_names, TRAIN_TEMPLATES, 6, seed), cache, max_length)
    features = [memory.known_features(*pos), memory.known_features(*neg)]
    head = torch.nn.Linear(features[0].shape[1], 1)
    opt = torch.optim.AdamW(head.parameters(), lr=1e-2, weight_decay=1e-3)
    rng = np.random.default_rng(seed)
    target = torch.cat([torch.ones(BATCH), torch.zeros(BATCH)])
    for _ in range(STEPS):  # balanced batches: half known, half unknown
        x = torch.cat([f[rng.integers(len(f), size=BATCH)] for f in features])
        loss = F.binary_cross_entropy_with_logits(head(x).squeeze(-1), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    groups = _groups(memory, eval_captions() + binding_captions(), cache, max_length)
    groups["unknown_heldout"] = (
        reads(memory, unknown_captions(held_names, HELDOUT_TEMPLATES, 2, seed + 1), cache, max_length),
        slice(None),
    )

    def warned() -> dict:  # the share of each group whose reported subject p is below the threshold
        with torch.no_grad():
            return {
                k: float(np.mean(memory.reported(*r).amax(-1).numpy()[sel] < SUBJECT_THRESHOLD))
                for k, (r, sel) in groups.items()
            }

    before = warned()
    memory.known = head
    generator.config.known_subject = True
    after = warned()
    figures = {
        "threshold": SUBJECT_THRESHOLD,
        "unknown_names": {"train": len(train_names), "heldout": len(held_names)},
        "warned_before": before,
        "warned": after,
    }
    log(json.dumps(figures, indent=1))
    return figures


def _groups(memory, evals, cache, max_length) -> dict:
    """Per evaluation split, the subject memory's (read, logits) and which prompts it covers (synonyms
    apart as read right / wrong)."""
    read, logits = reads(memory, [c.text for c in evals], cache, max_length)
    kinds = np.array([kind(c) for c in evals])
    right = logits.argmax(-1).numpy() == np.array([c.emoji for c in evals])
    out = {k: (kinds == k) for k in ("seen", "template", "binding")}
    out["synonym_read_right"] = (kinds == "synonym") & right
    out["synonym_read_wrong"] = (kinds == "synonym") & ~right
    return {k: ((read, logits), sel) for k, sel in out.items()}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=Path("export/emoji64"), help="a trained emoji64 directory")
    p.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "edgegen-emoji64")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    gdir = a.model / "generator"
    try:
        generator = load_generator(gdir).eval()
    except CheckpointError as e:
        raise SystemExit(f"error: {e}") from None
    if not generator.config.concepts:
        raise SystemExit(
            f"{gdir}: this generator has no concept memories, so no subject lookup to fit a head on"
        )
    figures = fit(generator, a.cache, a.seed)
    generator.config.save(gdir / "config.json")
    state = {k: v.detach().contiguous() for k, v in generator.state_dict().items()}
    save_file(state, gdir / "model.safetensors")
    metrics_path = a.model / "metrics.json"
    if metrics_path.is_file():
        metrics = json.loads(metrics_path.read_text())
        metrics["known_subject"] = figures
        metrics_path.write_text(json.dumps(metrics, indent=2))
    return figures


if __name__ == "__main__":
    main()
