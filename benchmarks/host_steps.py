"""What the runtime's own host-side steps cost, warm and right after an engine run (gan bundles, ort-cpu).

    python -m benchmarks.host_steps [BUNDLE] [--precision int8] [--rounds 300] [--prompt TEXT]

`edgegen bench` reports the overhead of a call (end to end minus engine time) and its stages; this says
why it is what it is: each step as the pipeline runs it (tokens encoded and padded into the bound input
buffers; the seed's noise drawn into its buffer; the images and the prompt's text states copied out of the
bound outputs), timed in a loop of its own (warm caches) and alternated with a run of the fused graph (the
caches a real call sees). Medians in microseconds.

Beside them, the other ways: ``*_python`` is the pure-Python host path (what runs where the native module
``runtime/_hostpath.c`` could not be built; for the noise, a new numpy Generator per seed),
``tokenize_library`` the tokenizers library on every call (no word cache).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from edgegen.runtime import Pipeline, native
from edgegen.runtime.bench import DEFAULT_PROMPT
from edgegen.runtime.tokenize import PromptTokenizer


def numpy_twin(step):
    """The step with native.hostpath off: the numpy twins run (the switch costs ~0.1 us, counted in)."""

    def run():
        module, native.hostpath = native.hostpath, None
        try:
            step()
        finally:
            native.hostpath = module

    return run


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", nargs="?", help="a gan bundle (default: the shipped default model)")
    p.add_argument("--precision", default="int8")
    p.add_argument("--rounds", type=int, default=300)
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    a = p.parse_args(argv)
    if a.bundle is None:
        from edgegen.export.default import default_bundle

        a.bundle = default_bundle()
    pipe = Pipeline.from_bundle(a.bundle, backend="ort-cpu", precision=a.precision)
    graph, tokenizer = pipe.graph("fused"), pipe.tokenizer
    length = tokenizer.encode([a.prompt]).length
    ins = graph.inputs(1, length)
    library = PromptTokenizer.of_bundle(pipe.bundle, tokenizer.pad_to_longest)
    library.by_words = False
    tokenizer.encode([a.prompt])  # its word cache learns the prompt's words
    outs = graph.outputs(1, length)
    steps = {
        "tokenize": lambda: tokenizer.encode([a.prompt]).write(ins["input_ids"], ins["attention_mask"]),
        "tokenize_library": lambda: library.encode([a.prompt]).write(ins["input_ids"], ins["attention_mask"]),
        "noise": lambda: native.fill_noise([0], ins["noise"]),
        # the copies out of the bound outputs: the prompt's text states, the images
        "output": lambda: (native.copy_rows(outs["text_states"], 0, length), native.copy(outs["pixels"])),
    }
    if native.hostpath is not None:
        for name in ("tokenize", "noise", "output"):
            steps[f"{name}_python"] = numpy_twin(steps[name])
    after_run = {name: [] for name in steps}
    for _ in range(a.rounds):
        for name, step in steps.items():
            graph.run(1, sequence=length)
            start = time.perf_counter_ns()
            step()
            after_run[name].append(time.perf_counter_ns() - start)
    warm = {name: [] for name in steps}
    for name, step in steps.items():
        for _ in range(a.rounds):
            start = time.perf_counter_ns()
            step()
            warm[name].append(time.perf_counter_ns() - start)
    result = {
        name: {
            "warm_us": float(np.median(warm[name])) / 1e3,
            "after_engine_run_us": float(np.median(after_run[name])) / 1e3,
        }
        for name in steps
    }
    print(
        f"{a.precision}, prompt {a.prompt!r} ({length} token positions), {a.rounds} rounds, medians"
        f"{'' if native.hostpath is not None else ' (the native host path is not built here)'}:"
    )
    for name, r in result.items():
        print(
            f"  {name:16s} warm {r['warm_us']:7.1f} us   "
            f"right after an engine run {r['after_engine_run_us']:7.1f} us"
        )
    return result


if __name__ == "__main__":
    main()
