"""`edgegen bench`: on-device latency of a pipeline, per stage, with the runtime's own overhead.

Each iteration is one pipeline call timed by the pipeline itself (monotonic clock around the whole call
and around each stage). New-prompt calls run with an empty text cache (cleared outside the timed call);
repeated-prompt calls reuse the cached text states. The tokenizer's word cache is not emptied: the
prompt's words are known after the warm-up, as an app's usual words are (`python -m benchmarks.host_steps`
times the tokenizers library's path, which a prompt with a new word takes).
"""
from __future__ import annotations

import resource
import sys
import time

import numpy as np

PERCENTILES = (50, 95, 99)


def summarize(samples_ms) -> dict:
    """{"p50", "p95", "p99", "mean", "min"} of a list of milliseconds."""
    a = np.asarray(samples_ms, dtype=np.float64)
    out = {f"p{q}": float(np.percentile(a, q)) for q in PERCENTILES}
    out.update(mean=float(a.mean()), min=float(a.min()))
    return out


def _peak_rss_mb() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 if sys.platform != "darwin" else kb / 2**20


DEFAULT_PROMPT = "a rocket on a blue background"


def run_bench(pipe, batch: int = 1, iterations: int = 100, warmup: int = 10, seconds: float | None = None,
              prompt: str = DEFAULT_PROMPT) -> dict:
    """Time ``iterations`` calls (or as many as fit in ``seconds``) after ``warmup`` untimed ones."""
    prompts = [prompt] * batch
    seeds = list(range(batch))

    def new_prompt_call():
        pipe.clear_cache()
        pipe(prompts, seed=seeds, output_type="np")
        return pipe.last_call

    for _ in range(warmup):
        new_prompt_call()
    calls, deadline = [], None if seconds is None else time.monotonic() + seconds
    while len(calls) < iterations if deadline is None else time.monotonic() < deadline:
        calls.append(new_prompt_call())
    e2e = [c.total_ns / 1e6 for c in calls]
    engine = [c.engine_ns / 1e6 for c in calls]
    stage_names = list(dict.fromkeys(s for c in calls for s in c.stages))
    stages = {s: {"p50": float(np.median([c.stages.get(s, 0) / 1e6 for c in calls])),
                  "engine": s in calls[0].engine_stages} for s in stage_names}
    result = {
        "bundle": str(pipe.bundle.root), "family": pipe.bundle.family, "backend": pipe.backend,
        "precision": pipe.precision, "form": pipe.form, "batch": batch, "iterations": len(calls), "warmup": warmup,
        "path": calls[0].path, "prompt": prompt,
        "sequence": calls[0].sequence,  # token positions the text graphs ran at (0: no such axis)
        "cuda_graphs": any(getattr(g, "cuda_graphs", False) for g in pipe._graphs.values()),
        "end_to_end_ms": summarize(e2e),
        "stages_ms": stages,
        "engine_ms": summarize(engine),
        "overhead_ms": summarize([a - b for a, b in zip(e2e, engine)]),
        "images_per_s": batch * 1000.0 / float(np.median(e2e)),
    }
    if getattr(pipe, "mode", "auto") == "auto":
        pipe(prompts, seed=seeds, output_type="np")  # fill the cache
        cached = []
        for _ in range(max(10, len(calls) // 2)):
            pipe(prompts, seed=seeds, output_type="np")
            cached.append(pipe.last_call.total_ns / 1e6)
        result["repeated_prompt_ms"] = summarize(cached)
        result["repeated_prompt_speedup"] = result["end_to_end_ms"]["p50"] / result["repeated_prompt_ms"]["p50"]
    result["peak_rss_mb"] = _peak_rss_mb()
    return result


def format_table(r: dict) -> str:
    e = r["end_to_end_ms"]
    graphs = ", CUDA graphs" if r.get("cuda_graphs") else ""
    tokens = f", {r['sequence']} token positions" if r.get("sequence") else ""
    lines = [f"edgegen bench  {r['bundle']}  ({r['family']}, {r['backend']}{graphs}, {r['precision']}, batch {r['batch']}, "
             f"{r['iterations']} iterations after {r['warmup']} warm-up)",
             f"  prompt {r['prompt']!r}{tokens}",
             f"  end to end      p50 {e['p50']:8.3f} ms   p95 {e['p95']:8.3f}   p99 {e['p99']:8.3f}   mean {e['mean']:8.3f}"]
    for name, s in r["stages_ms"].items():
        lines.append(f"    {name:13s} p50 {s['p50']:8.3f} ms{'   (engine)' if s['engine'] else ''}")
    overhead = r["overhead_ms"]["p50"]
    lines.append(f"  engine          p50 {r['engine_ms']['p50']:8.3f} ms")
    lines.append(f"  overhead        p50 {overhead:8.3f} ms   ({100 * overhead / e['p50']:.1f} % of end to end)")
    if "repeated_prompt_ms" in r:
        lines.append(f"  repeated prompt p50 {r['repeated_prompt_ms']['p50']:8.3f} ms   "
                     f"({r['repeated_prompt_speedup']:.2f}x the new-prompt call; text states cached)")
    lines.append(f"  {r['images_per_s']:.1f} images/s, peak RSS {r['peak_rss_mb']:.0f} MB")
    return "\n".join(lines)
