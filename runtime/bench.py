"""`edgegen bench`: on-device latency of a pipeline, per stage, with the runtime's own overhead; with several
precisions, their pipelines timed interleaved in one process, each one's ratio to fp32 from the same run.

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

from .backends import backend_spec
from .errors import BackendUnavailableError

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
BLOCK = 20  # calls per turn when several pipelines are timed interleaved


def run_bench(
    pipe,
    batch: int = 1,
    iterations: int = 100,
    warmup: int = 10,
    seconds: float | None = None,
    prompt: str = DEFAULT_PROMPT,
) -> dict:
    """Time ``iterations`` calls (or as many as fit in ``seconds``) after ``warmup`` untimed ones: one run."""
    return run_benches({"one": pipe}, batch, iterations, warmup, seconds, prompt)["runs"][0]


def run_benches(
    pipes: dict,
    batch: int = 1,
    iterations: int = 100,
    warmup: int = 10,
    seconds: float | None = None,
    prompt: str = DEFAULT_PROMPT,
    block: int = BLOCK,
) -> dict:
    """Pipelines (one per precision) timed in one process, taking turns in blocks of ``block`` calls
    (A B C, B C A, ...), so the machine's drift reaches them alike: ``iterations`` calls each (or rounds until
    ``seconds`` have passed), after ``warmup`` untimed ones each. The result has one shape however many
    pipelines are timed (DESIGN.md's bench JSON): ``runs``, a list of each one's result in the order given,
    and, with several pipelines one of which is "fp32", ``speedup_vs_fp32`` {name: fp32's end-to-end p50
    over that one's}, from this same run."""
    prompts, seeds = [prompt] * batch, list(range(batch))
    for pipe in pipes.values():
        new_prompt_calls(pipe, prompts, seeds, warmup)
    names = list(pipes)
    calls = {name: [] for name in names}
    deadline = None if seconds is None else time.monotonic() + seconds
    rounds = 0
    while (
        (min(len(c) for c in calls.values()) < iterations)
        if deadline is None
        else time.monotonic() < deadline
    ):
        for name in names[rounds % len(names) :] + names[: rounds % len(names)]:
            wanted = block if deadline is not None else min(block, iterations - len(calls[name]))
            calls[name] += new_prompt_calls(pipes[name], prompts, seeds, wanted)
        rounds += 1
    runs = {name: summarize_calls(pipes[name], calls[name], prompts, seeds, warmup) for name in names}
    result = {"runs": list(runs.values()), "interleaved": {"block": block, "rounds": rounds}}
    if len(runs) > 1 and "fp32" in runs:
        result["speedup_vs_fp32"] = speedups(runs, "fp32")
    return result


def speedups(runs: dict, base: str) -> dict:
    """{name: the base run's end-to-end p50 over that run's}."""
    base_ms = runs[base]["end_to_end_ms"]["p50"]
    return {name: base_ms / r["end_to_end_ms"]["p50"] for name, r in runs.items()}


def _call(pipe, prompts, seeds) -> None:
    """One call as the bench times it: the raw pixels (no float conversion timed), with stand-ins for the
    inputs the bundle requires besides the prompt (e.g. a ControlNet's control image)."""
    pipe(prompts, seed=seeds, output_type="uint8", **pipe.stand_in_inputs())


def new_prompt_calls(pipe, prompts, seeds, count: int) -> list:
    """``count`` timed calls, each with an empty text cache (emptied outside the timed call)."""
    calls = []
    for _ in range(count):
        pipe.clear_cache()
        _call(pipe, prompts, seeds)
        calls.append(pipe.last_call)
    return calls


def summarize_calls(pipe, calls, prompts, seeds, warmup: int) -> dict:
    """The bench result of these new-prompt calls, then the same pipeline's repeated-prompt calls."""
    batch = len(prompts)
    e2e = [c.total_ns / 1e6 for c in calls]
    engine = [c.engine_ns / 1e6 for c in calls]
    stage_names = list(dict.fromkeys(s for c in calls for s in c.stages))
    stages = {
        s: {
            "p50": float(np.median([c.stages.get(s, 0) / 1e6 for c in calls])),
            "engine": s in calls[0].engine_stages,
        }
        for s in stage_names
    }
    result = {
        "bundle": str(pipe.bundle.root),
        "family": pipe.bundle.family,
        "backend": pipe.backend,
        "precision": pipe.precision,
        "form": pipe.form,
        "batch": batch,
        "iterations": len(calls),
        "warmup": warmup,
        "path": calls[0].path,
        "prompt": prompts[0],
        "sequence": calls[0].sequence,  # token positions the text graphs ran at (0: no such axis)
        "cuda_graphs": any(getattr(g, "cuda_graphs", False) for g in pipe._graphs.values()),
        "end_to_end_ms": summarize(e2e),
        "stages_ms": stages,
        "engine_ms": summarize(engine),
        "overhead_ms": summarize([a - b for a, b in zip(e2e, engine)]),
        "images_per_s": batch * 1000.0 / float(np.median(e2e)),
    }
    if getattr(pipe, "mode", "auto") == "auto":
        _call(pipe, prompts, seeds)  # fill the cache
        cached = []
        for _ in range(max(10, len(calls) // 2)):
            _call(pipe, prompts, seeds)
            cached.append(pipe.last_call.total_ns / 1e6)
        result["repeated_prompt_ms"] = summarize(cached)
        result["repeated_prompt_speedup"] = (
            result["end_to_end_ms"]["p50"] / result["repeated_prompt_ms"]["p50"]
        )
    result["peak_rss_mb"] = _peak_rss_mb()
    gpu = gpu_memory_mb(pipe.backend)
    if gpu is not None:
        result["gpu_memory_mb"] = gpu
    return result


def gpu_memory_mb(backend: str) -> dict | None:
    """GPU backends: the device memory in use after the timed calls, MiB (cudaMemGetInfo: device-wide, other
    processes included; ONNX Runtime's arena and TensorRT's buffers persist between calls, so it includes
    the calls' peak). None on the CPU or where the CUDA runtime cannot be asked."""
    if not backend_spec(backend).gpu:
        return None
    from .cudart import runtime

    try:
        free, total = runtime().memory()
    except BackendUnavailableError:
        return None
    return {"device_used": (total - free) / 2**20, "device_total": total / 2**20}


def format_table(r: dict) -> str:
    e = r["end_to_end_ms"]
    graphs = ", CUDA graphs" if r.get("cuda_graphs") else ""
    tokens = f", {r['sequence']} token positions" if r.get("sequence") else ""
    lines = [
        f"edgegen bench  {r['bundle']}  ({r['family']}, {r['backend']}{graphs}, {r['precision']}, "
        f"batch {r['batch']}, {r['iterations']} iterations after {r['warmup']} warm-up)",
        f"  prompt {r['prompt']!r}{tokens}",
        f"  end to end      p50 {e['p50']:8.3f} ms   p95 {e['p95']:8.3f}   p99 {e['p99']:8.3f}   "
        f"mean {e['mean']:8.3f}",
    ]
    for name, s in r["stages_ms"].items():
        lines.append(f"    {name:13s} p50 {s['p50']:8.3f} ms{'   (engine)' if s['engine'] else ''}")
    overhead = r["overhead_ms"]["p50"]
    lines.append(f"  engine          p50 {r['engine_ms']['p50']:8.3f} ms")
    lines.append(
        f"  overhead        p50 {overhead:8.3f} ms   ({100 * overhead / e['p50']:.1f} % of end to end)"
    )
    if "repeated_prompt_ms" in r:
        lines.append(
            f"  repeated prompt p50 {r['repeated_prompt_ms']['p50']:8.3f} ms   "
            f"({r['repeated_prompt_speedup']:.2f}x the new-prompt call; text states cached)"
        )
    lines.append(f"  {r['images_per_s']:.1f} images/s, peak RSS {r['peak_rss_mb']:.0f} MB")
    if "gpu_memory_mb" in r:
        g = r["gpu_memory_mb"]
        lines.append(
            f"  GPU memory in use after the calls {g['device_used']:.0f} of {g['device_total']:.0f} MiB "
            "(whole device)"
        )
    return "\n".join(lines)


def format_runs(r: dict) -> str:
    """run_benches' result as text: one table per run; with several, how they took turns and their ratios."""
    lines = [format_table(run) for run in r["runs"]]
    if len(r["runs"]) == 1:
        return lines[0]
    i = r["interleaved"]
    lines.append(
        f"interleaved in one process: blocks of {i['block']} calls taking turns, {i['rounds']} rounds"
    )
    if "speedup_vs_fp32" in r:
        lines.append(
            "  end to end p50 against fp32's in this run: "
            + ", ".join(f"{name} {x:.2f}x" for name, x in r["speedup_vs_fp32"].items() if name != "fp32")
        )
    return "\n".join(lines)
