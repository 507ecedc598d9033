"""Train emoji64: the judge (if absent), MiniLM states for the caption set (cached), then the generator.

    python -m training.train [--steps 12000] [--out export/emoji64] [--seed 0]

Recipe (see training/README.md for the measurements behind it): targets are real renders. The noise
explains the variation the caption does not: its first two coordinates set the jitter and the third
the size when the caption does not name one. So every (caption, noise) pair has exactly one target and
a plain L1 loss gives sharp images and seed diversity at the cost of one forward/backward per item.
The shipped renderer (``--renderer glyph``) draws each emoji from a learned glyph that its concept
memory stores; the keys that read concepts from the text learn with cross-entropy against the caption's
labels. No judge takes part unless ``--judge-weight`` is given (the older conv runs used one). Weights
are averaged (EMA); BatchNorm statistics, where the renderer has any, are recalibrated before saving.
A second judge that training never sees scores the result too (training/crosscheck.py).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from edgegen.export.generator import ConditionalGenerator, GeneratorConfig
from edgegen.export.judge import load_judge
from safetensors.torch import save_file
from tqdm import tqdm

from .crosscheck import SECOND_JUDGE_SEED, score, second_judge
from .dataset import (
    BACKGROUNDS,
    JITTER,
    SIZE_NAMES,
    SIZES,
    binding_captions,
    binding_training_captions,
    eval_captions,
    kind,
    render,
    to_tensor,
    training_captions,
)
from .emoji_set import EMOJI
from .evaluate import evaluate
from .judge import train_judge
from .known import fit as fit_known_head
from .report import write_model_files
from .text_states import cached_states


def variation_from_noise(z: torch.Tensor, size: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Jitter (dx, dy) in [-JITTER, JITTER] from z[:, 0:2]; the size from the sign of z[:, 2] where the
    caption left it unset (-1). Deterministic in z, so the generator can learn it."""
    jit = torch.clamp(torch.round(z[:, :2] * 1.5), -JITTER, JITTER).long().numpy()
    size = np.where(size < 0, (z[:, 2] > 0).long().numpy(), size)
    return jit, size


def targets(emoji, background, size, jitter) -> torch.Tensor:
    return to_tensor(
        np.stack([render(e, b, SIZE_NAMES[s], j) for e, b, s, j in zip(emoji, background, size, jitter)])
    )


@torch.no_grad()
def recalibrate_batchnorm(gen, states, mask, n_batches=60, batch=64, seed=0):
    """Running stats as a plain average over fresh batches (momentum=None), in train mode."""
    g = torch.Generator().manual_seed(seed)
    bns = [m for m in gen.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    gen.train()
    for _ in range(n_batches):
        idx = torch.randint(len(states), (batch,), generator=g).numpy()
        gen(
            torch.randn(batch, gen.config.noise_dim, generator=g),
            torch.from_numpy(states[idx]).float(),
            torch.from_numpy(mask[idx]),
        )
    for m in bns:
        m.momentum = 0.1
    gen.eval()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--steps", type=int, default=12000, help="generator steps (~9 min at 1 thread on this CPU)"
    )
    p.add_argument("--out", type=Path, default=Path("export/emoji64"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "edgegen-emoji64")
    p.add_argument(
        "--threads", type=int, default=1, help="torch threads; 1 is fastest when the 2 cores are shared"
    )
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument(
        "--renderer",
        choices=["glyph", "conv"],
        default="glyph",
        help="glyph: learned glyph per emoji drawn by the concept memories (shipped); conv: conv decoder",
    )
    p.add_argument(
        "--glyph-side", type=int, default=32, help="glyph resolution stored per emoji (glyph renderer)"
    )
    p.add_argument(
        "--judge-weight",
        type=float,
        default=0.0,
        help="weight of the frozen judge's cross-entropy on generated images (0: not used; the conv runs "
        "in training/README.md used 0.1, which inflates that judge's own adherence figure)",
    )
    p.add_argument("--judge-steps", type=int, nargs=2, default=[1000, 300], help="one-cycle and polish steps")
    p.add_argument("--channels", type=int, nargs="+", default=[128, 64, 32, 16])
    p.add_argument(
        "--attention",
        type=int,
        nargs="*",
        default=[],
        help="resolutions with cross-attention to the token states (e.g. 8 16; default none)",
    )
    p.add_argument("--cond-dim", type=int, default=192)
    p.add_argument("--attention-dim", type=int, default=64)
    p.add_argument("--captions-per-pair", type=int, default=6)
    p.add_argument(
        "--binding-per-pair",
        type=int,
        default=2,
        help="binding captions per (emoji, background) pair (colour words on the subject and the "
        "background, both orders, distractors; 0: none, the recipe before issue 21)",
    )
    p.add_argument(
        "--concept-heads",
        type=int,
        default=2,
        help="attention heads each concept memory pools the token states with (0: the mean only)",
    )
    p.add_argument(
        "--no-concepts",
        action="store_true",
        help="no concept memories (emoji, background, size); condition on --pooled / --attention only",
    )
    p.add_argument("--concept-weight", type=float, default=0.5, help="weight of the lookups' cross-entropy")
    p.add_argument("--pooled", action="store_true", help="also condition on an MLP of the pooled text states")
    p.add_argument("--eval-every", type=int, default=3000, help="steps between quick adherence checks")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    rng = np.random.default_rng(a.seed)
    a.out.mkdir(parents=True, exist_ok=True)
    log_file = open(a.out / "train_log.txt", "w")

    def log(msg):
        tqdm.write(msg)
        print(msg, file=log_file, flush=True)

    t_start = time.time()
    log(f"command: python -m training.train {' '.join(argv if argv is not None else sys.argv[1:])}")
    if not (a.out / "judge" / "model.safetensors").is_file():
        train_judge(a.out, *a.judge_steps, seed=a.seed, log=log)
    judge = load_judge(a.out / "judge")
    for q in judge.parameters():
        q.requires_grad_(False)
    real = np.load(a.out / "real_features.npz")

    cfg = GeneratorConfig(
        channels=a.channels,
        attention_resolutions=a.attention,
        cond_dim=a.cond_dim,
        attention_dim=a.attention_dim,
        pooled_cond=a.pooled,
        concepts=[] if a.no_concepts else [len(EMOJI), len(BACKGROUNDS), len(SIZE_NAMES) + 1],
        concept_heads=a.concept_heads,
        renderer=a.renderer,
        glyph_side=a.glyph_side,
        glyph_boxes=[SIZES[n] for n in SIZE_NAMES],
        jitter=JITTER,
    )
    captions = training_captions(a.captions_per_pair, seed=a.seed)
    captions += binding_training_captions(a.binding_per_pair, seed=a.seed) if a.binding_per_pair else []
    evals = eval_captions() + binding_captions()
    states, mask = cached_states([c.text for c in captions], cfg.max_length, a.cache, log)
    ev_states, ev_mask = cached_states([c.text for c in evals], cfg.max_length, a.cache, log)
    lab_e = np.array([c.emoji for c in captions])
    lab_b = np.array([c.background for c in captions])
    lab_s = np.array([-1 if c.size is None else c.size for c in captions])

    gen = ConditionalGenerator(cfg)
    ema = copy.deepcopy(gen).eval()
    log(
        f"generator: {sum(q.numel() for q in gen.parameters()) / 1e6:.2f} M params, config {cfg}; "
        f"{len(captions)} training captions"
    )
    opt = torch.optim.AdamW(gen.parameters(), lr=a.lr, betas=(0.5, 0.99), weight_decay=0.0)
    t0 = time.time()
    hist = []
    for step in tqdm(range(a.steps), desc="generator", unit="step", mininterval=10):
        elapsed = time.time() - t0
        frac = step / a.steps
        for group in opt.param_groups:  # short warm-up, then cosine to 5%
            group["lr"] = a.lr * min(1.0, (step + 1) / 200) * (0.05 + 0.95 * 0.5 * (1 + np.cos(np.pi * frac)))
        idx = rng.integers(len(captions), size=a.batch)
        z = torch.from_numpy(rng.standard_normal((a.batch, cfg.noise_dim), dtype=np.float32))
        jit, size = variation_from_noise(z, lab_s[idx])
        target = targets(lab_e[idx], lab_b[idx], size, jit)
        gen.train()
        text, m = torch.from_numpy(states[idx]).float(), torch.from_numpy(mask[idx])
        # Each memory's label (emoji, background, size; size 0 = not said): the renderer learns from the
        # labelled concepts (teacher forcing) while the lookups learn to read them from the text.
        labels = [torch.from_numpy(y[idx]) for y in (lab_e, lab_b, lab_s + 1)][: len(cfg.concepts)]
        x = gen(z, text, m, concept_labels=labels)
        l1 = (x - target).abs().mean()
        l1_low = (F.avg_pool2d(x, 4) - F.avg_pool2d(target, 4)).abs().mean()  # coarse layout and colour
        loss = l1 + l1_low
        ce = torch.zeros(())
        if a.judge_weight:
            le, lb, _ = judge(x)
            ce = F.cross_entropy(le, torch.from_numpy(lab_e[idx])) + F.cross_entropy(
                lb, torch.from_numpy(lab_b[idx])
            )
            loss = loss + a.judge_weight * ce
        for memory, y in zip(gen.memories, labels):
            loss = loss + a.concept_weight * F.cross_entropy(memory.logits(memory.read(text, m)), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            decay = min(0.998, (1 + step) / (10 + step))
            for pe, pg in zip(ema.parameters(), gen.parameters()):
                pe.lerp_(pg, 1 - decay)
            for be, bg in zip(ema.buffers(), gen.buffers()):
                be.copy_(bg)
        hist.append([l1.item(), l1_low.item(), ce.item()])
        if (step + 1) % 100 == 0:
            h = np.mean(hist[-100:], 0)
            log(
                f"step {step + 1} {elapsed / 60:.1f} min lr {opt.param_groups[0]['lr']:.2e} "
                f"l1 {h[0]:.4f} l1_low {h[1]:.4f} judge_ce {h[2]:.3f}"
            )
        if (step + 1) % a.eval_every == 0:
            r = evaluate(ema, judge, ev_states, ev_mask, evals, real["mu"], real["sigma"], seeds=[0, 1])
            log(
                f"check @ step {step + 1}: adherence seen {r.get('adherence_seen', 0):.3f} heldout "
                f"{r.get('adherence_heldout', 0):.3f} "
                f"(templates {r.get('adherence_heldout_templates', 0):.3f} "
                f"synonyms {r.get('adherence_heldout_synonyms', 0):.3f}; emoji/background right: seen "
                f"{r['emoji_acc_seen']:.2f}/{r['background_acc_seen']:.2f} templates "
                f"{r['emoji_acc_heldout_templates']:.2f}/{r['background_acc_heldout_templates']:.2f} "
                f"synonyms {r['emoji_acc_heldout_synonyms']:.2f}/{r['background_acc_heldout_synonyms']:.2f}) "
                f"binding {r.get('adherence_binding', float('nan')):.3f} "
                f"(held-out binding templates {r.get('adherence_binding_templates', float('nan')):.3f}) "
                f"diversity {r['diversity']:.4f} FD {r['frechet_judge_distance']:.2f}"
            )
            if cfg.concepts:  # how well the emoji lookup alone reads the eval prompts (the text side's share)
                with torch.no_grad():
                    memory = ema.memories[0]
                    text = memory.read(torch.from_numpy(ev_states).float(), torch.from_numpy(ev_mask))
                    read = memory.logits(text).argmax(1).numpy()
                right = read == np.array([c.emoji for c in evals])
                kinds = np.array([kind(c) for c in evals])
                log(
                    "  emoji lookup accuracy: "
                    + ", ".join(
                        f"{k} {right[kinds == k].mean():.3f}"
                        for k in ("seen", "template", "synonym", "binding")
                        if (kinds == k).any()
                    )
                )
    train_minutes = (time.time() - t0) / 60
    step = a.steps
    log(f"generator: {step} steps ({step * a.batch} images) in {train_minutes:.1f} min")

    recalibrate_batchnorm(ema, states, mask, seed=a.seed)
    known = None
    if cfg.concepts:  # how sure the subject lookup is that a prompt names a subject it knows (known.py)
        known = fit_known_head(ema, a.cache, a.seed, log, [c.text for c in captions])
        cfg.known_subject = True  # what is saved below (ema holds a copy)
    gdir = a.out / "generator"
    gdir.mkdir(exist_ok=True)
    cfg.save(gdir / "config.json")
    save_file({k: v.detach().contiguous() for k, v in ema.state_dict().items()}, gdir / "model.safetensors")

    metrics = evaluate(ema, judge, ev_states, ev_mask, evals, real["mu"], real["sigma"])
    # A second opinion from a judge this run never used (trained once, cached): see training/crosscheck.py.
    second = score(
        ema, second_judge(a.cache / f"judge-seed{SECOND_JUDGE_SEED}", log=log), ev_states, ev_mask, evals
    )
    judge_metrics = json.loads((a.out / "judge" / "train_metrics.json").read_text())
    metrics = {
        "judge_accuracy_real_heldout": {
            "emoji": judge_metrics["emoji"],
            "background": judge_metrics["background"],
            "n": judge_metrics["n"],
        },
        **metrics,
        "second_judge": {"seed": SECOND_JUDGE_SEED, **second},
        **({"known_subject": known} if known else {}),
        "generator_steps": step,
        "batch": a.batch,
        "generator_training_minutes": round(train_minutes, 1),
        "judge_training_minutes": round(judge_metrics.get("minutes", 0), 1),
        "total_minutes": round((time.time() - t_start) / 60, 1),
        "machine": f"{platform.machine()} {platform.processor() or ''} "
        f"{torch.get_num_threads()} torch thread(s), torch {torch.__version__}".replace("  ", " "),
        "command": "python -m training.train " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    log(json.dumps(metrics, indent=2))
    write_model_files(a.out, cfg, evals, metrics)


if __name__ == "__main__":
    main()
