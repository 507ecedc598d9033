"""What a LoRA merged at load costs: load time, first-call time and peak memory of a pipeline with and
without a LoRA, each in a fresh process (peak RSS is a process's high-water mark).

    python -m benchmarks.lora_load [--work /tmp/edgegen-sdturbo] [--size 256] [--rank 16] [--repeats 3]
                                   [--json OUT]

Model: the SD-Turbo architecture with random weights, AutoencoderTiny VAE (benchmarks.diffusion_cpu builds
and exports it once into --work, fp32); the LoRA: random, rank --rank, on every attention projection
and resnet conv1 of the UNet and the text encoder's attention (edgegen.export.testing.make_random_lora).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def child(bundle: str, lora: str | None) -> dict:
    """One load and one call in this process; times in ms, peak RSS in MiB."""
    from edgegen.runtime import Pipeline
    from edgegen.runtime.bundle import Bundle
    from edgegen.runtime.lora import LoraMerge

    out = {}
    if lora:  # the merge alone (reading the file, W + scale * up @ down in numpy), before the real load
        t = time.perf_counter()
        merge = LoraMerge(Bundle.open(bundle), "fp32", [(lora, 0.8)])
        out["merge_ms"] = (time.perf_counter() - t) * 1e3
        out["merged_mib"] = sum(a.nbytes for a in merge.merged.values()) / 2**20
        out["merged_tensors"] = len(merge.merged)
        del merge
    t = time.perf_counter()
    pipe = Pipeline.from_bundle(
        bundle, backend="ort-cpu", precision="fp32", cache_size=0, lora=[(lora, 0.8)] if lora else None
    )
    out["load_ms"] = (time.perf_counter() - t) * 1e3
    t = time.perf_counter()
    pipe("a photo of a cat", seed=0, output_type="uint8")
    out["first_call_ms"] = (time.perf_counter() - t) * 1e3
    out["peak_rss_mib"] = _status_mib("VmHWM")
    out["rss_mib"] = _status_mib("VmRSS")
    return out


def _status_mib(field: str) -> float:
    """This process's memory from /proc (getrusage's ru_maxrss survives exec: it would report the parent's
    export)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="/tmp/edgegen-sdturbo", help="where the models are built (reused)")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3, help="fresh processes per configuration")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--child", nargs=2, metavar=("BUNDLE", "LORA"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child[0], None if args.child[1] == "-" else args.child[1])))
        return 0

    from edgegen.export.testing import make_random_lora

    from benchmarks.diffusion_cpu import build, taesd_dir

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    ckpt, bundle = build(work, args.size, tiny=False, taesd=taesd_dir(work))
    lora = work / f"lora-r{args.rank}.safetensors"
    if not lora.is_file():
        make_random_lora(lora, ckpt, rank=args.rank, alpha=args.rank)
    runs: dict[str, list[dict]] = {"without": [], "with": []}
    for _ in range(args.repeats):  # alternated, so drifting machine load hits both alike
        for name, arg in (("without", "-"), ("with", str(lora))):
            done = subprocess.run(
                [sys.executable, "-m", "benchmarks.lora_load", "--child", str(bundle), arg],
                capture_output=True,
                text=True,
                check=True,
            )
            runs[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
    median = {name: {k: float(np.median([r[k] for r in rs])) for k in rs[0]} for name, rs in runs.items()}
    result = {
        "machine": platform.processor() or platform.machine(),
        "bundle": str(bundle),
        "lora": {"file": str(lora), "mib": lora.stat().st_size / 2**20, "rank": args.rank},
        "median": median,
        "runs": runs,
    }
    print(f"LoRA {lora.name}: {result['lora']['mib']:.1f} MiB, rank {args.rank}")
    print("| | load | first call | RSS after the call | peak RSS |")
    print("|---|---:|---:|---:|---:|")
    for name, m in median.items():
        print(
            f"| {name} LoRA | {m['load_ms']:.0f} ms | {m['first_call_ms']:.0f} ms "
            f"| {m['rss_mib']:.0f} MiB | {m['peak_rss_mib']:.0f} MiB |"
        )
    w = median["with"]
    print(
        f"merge alone: {w['merge_ms']:.0f} ms, {w['merged_tensors']:.0f} tensors, {w['merged_mib']:.1f} MiB "
        "of merged weights held while the pipeline lives"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
