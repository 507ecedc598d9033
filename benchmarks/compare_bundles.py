"""Two bundles of one family, timed against each other: whole Pipeline calls, each with a new prompt, the
two pipelines taking turns in blocks in one process so drifting machine load hits both alike (separate
`edgegen bench` runs of the same bundle differed by up to 1.7x on this 2-core VM). Medians of all calls.

    python -m benchmarks.compare_bundles BEFORE AFTER [--precision int8] [--rounds 20] [--block 20] [--json]

E.g. a retrained model against the one it replaces: the default model's bundle before issue 21 against
today's (`python -c "from edgegen.export import default_bundle; print(default_bundle())"` at each commit).
"""

from __future__ import annotations

import argparse
import json
import time
import warnings

import numpy as np
from edgegen.runtime import Pipeline

from .overhead import prompts


def measure(bundles: list[str], precision: str, rounds: int, block: int) -> dict:
    pipes = [Pipeline.from_bundle(b, backend="ort-cpu", precision=precision) for b in bundles]
    texts = prompts(2 * (rounds + 1) * block)
    times = [[], []]
    calls = iter(range(len(texts)))
    for r in range(rounds + 1):  # round 0 warms both up and is not kept
        for side in (0, 1) if r % 2 == 0 else (1, 0):
            for _ in range(block):
                k = next(calls)
                start = time.perf_counter_ns()
                pipes[side](texts[k], seed=k, output_type="uint8")
                if r:
                    times[side].append(time.perf_counter_ns() - start)
    before, after = (float(np.median(t)) / 1e3 for t in times)
    return {
        "precision": precision,
        "calls_each": len(times[0]),
        "before_p50_us": before,
        "after_p50_us": after,
        "ratio": after / before,
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("before", help="a bundle directory")
    p.add_argument("after", help="a bundle directory of the same family")
    p.add_argument("--precision", default="int8", help="comma-separated (default int8)")
    p.add_argument("--rounds", type=int, default=20, help="blocks per bundle (default 20)")
    p.add_argument("--block", type=int, default=20, help="calls per block (default 20)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    a = p.parse_args(argv)
    with warnings.catch_warnings():  # a prompt with a word one model never read warns on every call
        warnings.simplefilter("ignore")
        runs = [measure([a.before, a.after], x.strip(), a.rounds, a.block) for x in a.precision.split(",")]
    result = {"before": a.before, "after": a.after, "runs": runs}
    if a.json:
        print(json.dumps(result, indent=2))
    else:
        for r in runs:
            print(
                f"{r['precision']}: before {r['before_p50_us']:.0f} us, after {r['after_p50_us']:.0f} us: "
                f"{r['ratio']:.3f}x ({r['calls_each']} calls each)"
            )
    return result


if __name__ == "__main__":
    main()
