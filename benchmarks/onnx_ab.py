"""Time ONNX files of bundles against each other, interleaved in one process (A B C A B C ...).

    python -m benchmarks.onnx_ab BUNDLE/onnx/fused.fp32.onnx OTHER/onnx/fused.int8.onnx [...]
                                 [--threads N] [--rounds 10] [--iterations 30] [--prompt TEXT]

Engine time alone (``InferenceSession.run``, no tokenizing or noise): for comparing two exports of the same
model (before / after a graph change) or one component at a thread count. Inputs: the prompt tokenized
with the file's bundle's tokenizer (padded as the CPU runtime pads it), the noise of seed 0, batch 1;
files need only those inputs.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from edgegen.runtime import Bundle
from edgegen.runtime.bench import DEFAULT_PROMPT
from edgegen.runtime.pipeline import noise_for_seeds
from edgegen.runtime.tokenize import PromptTokenizer


def feeds_for(path: Path, prompt: str) -> dict[str, np.ndarray]:
    bundle = Bundle.open(path.parent.parent)
    component = bundle.components.get(path.name.split(".")[0])
    # padded as the CPU runtime pads: to the prompt's length where the token axis is dynamic
    tokens = PromptTokenizer.of_bundle(bundle, component is not None and component.dynamic_sequence)([prompt])
    noise_shape = tuple(bundle.generation.get("noise_shape", []))
    return {
        "input_ids": tokens.input_ids,
        "attention_mask": tokens.attention_mask,
        "noise": noise_for_seeds([0], noise_shape),
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="+", type=Path, help="ONNX files inside bundles (BUNDLE/onnx/NAME.onnx)")
    p.add_argument(
        "--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: its default, all cores)"
    )
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--iterations", type=int, default=30, help="calls per file per round")
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    a = p.parse_args(argv)
    runs = {}
    for path in a.files:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = a.threads
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        wanted = {i.name for i in session.get_inputs()}
        feed = {k: v for k, v in feeds_for(path, a.prompt).items() if k in wanted}
        for _ in range(a.iterations):  # warm-up
            session.run(None, feed)
        runs[str(path)] = (session, feed, [])
    for _ in range(a.rounds):
        for session, feed, samples in runs.values():
            for _ in range(a.iterations):
                start = time.perf_counter()
                session.run(None, feed)
                samples.append((time.perf_counter() - start) * 1e3)
    result = {name: float(np.median(samples)) for name, (_, _, samples) in runs.items()}
    first = next(iter(result.values()))
    for name, ms in result.items():
        print(f"{ms:8.3f} ms  {first / ms:5.2f}x the first  {name}")
    return result


if __name__ == "__main__":
    main()
