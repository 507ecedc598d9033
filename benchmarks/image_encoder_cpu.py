"""The IP-Adapter's image encoder on this CPU: the graph edgegen exports for it (``image_encoder``, traced
the way a bundle's is) on ONNX Runtime against PyTorch eager, batch 1, interleaved.

    python -m benchmarks.image_encoder_cpu [--work /tmp/edgegen-image-encoder] [--rounds 5] [--json OUT]

Model: CLIPVisionModelWithProjection with the configuration of the image encoder IP-Adapter for SD 1.5
ships (ViT-H/14: 32 layers, width 1280, 224x224 pixels, 1024-wide embedding), random weights (latency does
not depend on their values). It runs once per distinct reference image (the runtime caches its embedding),
whatever the generated image's size.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

VIT_H = dict(
    hidden_size=1280,
    intermediate_size=5120,
    num_hidden_layers=32,
    num_attention_heads=16,
    image_size=224,
    patch_size=14,
    projection_dim=1024,
    hidden_act="gelu",
)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="/tmp/edgegen-image-encoder", help="where the graph is written (reused)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)

    import torch
    import transformers
    from edgegen.export.families.diffusion import ImageEncoder, image_encoder_component
    from edgegen.export.onnx_export import export_component
    from edgegen.runtime.backends import make_session

    torch.manual_seed(0)
    model = transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(**VIT_H)).eval()
    module = ImageEncoder(model).eval()
    n = VIT_H["image_size"]
    pixels = np.random.default_rng(0).standard_normal((1, 3, n, n), dtype=np.float32)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    path = work / "image_encoder.fp32.onnx"
    if not path.is_file():
        t = time.perf_counter()
        export_component(
            image_encoder_component(module), {"pixel_values": np.concatenate([pixels, pixels])}, path
        )
        print(f"exported {path} in {time.perf_counter() - t:.0f} s", flush=True)
    session = make_session(path, "ort-cpu")

    def runtime():
        return session.run(None, {"pixel_values": pixels})[0]

    @torch.no_grad()
    def eager():
        return module(torch.from_numpy(pixels)).numpy()

    diff = float(np.abs(runtime() - eager()).max())
    times = {"eager": [], "runtime": []}
    for _ in range(args.rounds):  # interleaved, so drifting machine load hits both alike
        for name, fn in (("eager", eager), ("runtime", runtime)):
            t = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t) * 1e3)
    median = {k: float(np.median(v)) for k, v in times.items()}
    result = {
        "machine": platform.processor() or platform.machine(),
        "config": VIT_H,
        "median_ms": median,
        "runs_ms": times,
        "max_abs_diff": diff,
    }
    print(
        f"image encoder (ViT-H/14, batch 1): eager {median['eager']:.0f} ms, edgegen graph on ONNX Runtime "
        f"{median['runtime']:.0f} ms ({median['eager'] / median['runtime']:.2f}x); max |diff| {diff:.2e}"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
