"""Long run: many consecutive generations; resident memory must not grow (target: <= 5 % after warm-up).

    python benchmarks/soak.py [BUNDLE] [--calls 5000] [--warmup 200] [--json]

Without BUNDLE it uses the shipped default model. Prompts rotate over a set larger than the text cache,
so the fused path, the cache and its evictions all run.
"""

from __future__ import annotations

import argparse
import json
import os
import time


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle", nargs="?")
    ap.add_argument("--calls", type=int, default=5000)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    from edgegen.runtime import Pipeline

    bundle = args.bundle
    if bundle is None:
        from edgegen.export import default_bundle

        bundle = default_bundle()
    pipe = Pipeline.from_bundle(bundle, backend="ort-cpu", precision=args.precision, cache_size=64)
    # 5- and 9-token prompts (emoji64's tokenizer): on the CPU the runtime keeps buffers per batch size and
    # length
    prompts = [
        f"a {c} {t} on a {b} background" if c else f"{t} on {b}"
        for c in ("small", "")
        for t in ("rocket", "cat", "apple", "star")
        for b in ("red", "blue", "green", "yellow", "white", "black", "purple", "orange", "pink", "gray")
    ]
    samples = []
    start = time.monotonic()
    for i in range(args.warmup + args.calls):
        pipe(prompts[i % len(prompts)], seed=i, num_images_per_prompt=1 + i % 4, output_type="uint8")
        if i == args.warmup:
            after_warmup = rss_mb()
        if i % 500 == 0:
            samples.append((i, round(rss_mb(), 1)))
    end = rss_mb()
    result = {
        "bundle": str(bundle),
        "precision": pipe.precision,
        "calls": args.calls,
        "warmup": args.warmup,
        "rss_after_warmup_mb": round(after_warmup, 1),
        "rss_end_mb": round(end, 1),
        "growth_percent": round(100 * (end - after_warmup) / after_warmup, 2),
        "samples": samples,
        "seconds": round(time.monotonic() - start, 1),
    }
    result["ok"] = result["growth_percent"] <= 5.0
    print(
        json.dumps(result, indent=2)
        if args.json
        else f"{args.calls} calls after {args.warmup} warm-up: RSS {after_warmup:.1f} -> {end:.1f} MB "
        f"({result['growth_percent']:+.2f} %), {result['seconds']} s: {'ok' if result['ok'] else 'GREW'}"
    )


if __name__ == "__main__":
    main()
