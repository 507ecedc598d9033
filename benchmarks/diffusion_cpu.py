"""Diffusion on this CPU: diffusers PyTorch eager fp32 against edgegen's runtime fp32, one text-to-image
call (1 step, no guidance), interleaved in one process so drifting machine load hits both alike.

    python -m benchmarks.diffusion_cpu [--work /tmp/edgegen-sdturbo] [--size 256] [--rounds 5] [--json OUT]
                                       [--tiny-only] [--skip-tiny] [--variants] [--taesd] [--controlnet]

Models: the SD-Turbo architecture with random weights (edgegen.export.testing.make_sd_turbo_checkpoint;
latency does not depend on the weights' values), built and exported once into --work, and the tiny test
model. Candidates: ``eager`` (StableDiffusionPipeline, output_type="np"), ``runtime fused`` (one ONNX
graph: text encoder, UNet, Euler step, VAE decoder, uint8 pixels) and ``runtime loop`` (one session per
stage, for the per-stage times). Every runtime call is a new-prompt call (text cache off).
``--variants`` also times the fused graph alone under other ONNX Runtime session settings. ``--taesd``
also measures the SD-Turbo architecture with an AutoencoderTiny VAE (TAESD's published architecture,
random weights; exported with ``vae=``, the same as ``edgegen export --vae``), diffusers eager with that
same AutoencoderTiny, and the end-to-end time against the AutoencoderKL bundle, per stage. ``--controlnet``
also measures the SD-Turbo architecture with a ControlNet (ControlNetModel.from_unet's architecture, random
weights; exported with ``controlnet=``, as ``edgegen export --controlnet``) against diffusers'
StableDiffusionControlNetPipeline, per stage (the ControlNet's own stage: ``controlnet_1``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

PROMPT = "a photo of a cat sitting on a wooden table"


def build(
    work: Path, size: int, tiny: bool, taesd: Path | None = None, controlnet: Path | None = None
) -> tuple[Path, Path]:
    """(checkpoint, bundle), made once and reused; ``taesd``: an AutoencoderTiny directory in place of
    the VAE; ``controlnet``: a ControlNetModel directory to add."""
    from edgegen.export import export_checkpoint
    from edgegen.export.testing import make_sd_turbo_checkpoint, make_tiny_diffusion_checkpoint

    ckpt = work / ("tiny" if tiny else "sd-turbo-arch")
    if not (ckpt / "model_index.json").is_file():
        t = time.perf_counter()
        (make_tiny_diffusion_checkpoint if tiny else make_sd_turbo_checkpoint)(ckpt)
        print(f"built {ckpt} in {time.perf_counter() - t:.0f} s", flush=True)
    suffix = ("-taesd" if taesd else "") + ("-controlnet" if controlnet else "")
    bundle = work / ("bundle-tiny" if tiny else f"bundle-{size}{suffix}")
    if not (bundle / "manifest.json").is_file():
        t = time.perf_counter()
        export_checkpoint(
            ckpt,
            bundle,
            precisions="fp32",
            overwrite=True,
            family_options=None
            if tiny
            else {"image_size": size, "fused_steps": [1], "vae": taesd, "controlnet": controlnet},
        )
        print(f"exported {bundle} in {time.perf_counter() - t:.0f} s", flush=True)
    return ckpt, bundle


def taesd_dir(work: Path) -> Path:
    from edgegen.export.testing import make_taesd_autoencoder

    path = work / "taesd-arch"
    if not (path / "config.json").is_file():
        make_taesd_autoencoder(path)
    return path


def controlnet_dir(work: Path) -> Path:
    from edgegen.export.testing import make_sd_turbo_controlnet

    path = work / "controlnet-arch"
    if not (path / "config.json").is_file():
        make_sd_turbo_controlnet(path)
    return path


def control_image(size: int) -> np.ndarray:
    """An edge-map-like condition (the ControlNet's cost does not depend on it)."""
    image = np.zeros((size, size, 3), np.uint8)
    image[size // 4 : 3 * size // 4, size // 4 :: 8] = 255
    return image


def eager_candidates(
    ckpt: Path, size: int, latents: np.ndarray, vae: Path | None = None, controlnet: Path | None = None
):
    import diffusers
    import torch
    from PIL import Image

    extra, control = {}, {}
    if vae:  # the same AutoencoderTiny the bundle was exported with
        extra["vae"] = diffusers.AutoencoderTiny.from_pretrained(vae, local_files_only=True).eval()
    cls = diffusers.StableDiffusionPipeline
    if controlnet:  # the same ControlNet the bundle was exported with
        cls = diffusers.StableDiffusionControlNetPipeline
        extra["controlnet"] = diffusers.ControlNetModel.from_pretrained(controlnet, local_files_only=True)
        control["image"] = Image.fromarray(control_image(size))
    pipe = cls.from_pretrained(ckpt, local_files_only=True, **extra)
    pipe.set_progress_bar_config(disable=True)
    lat = torch.from_numpy(latents)

    @torch.no_grad()
    def call():
        return pipe(
            PROMPT,
            num_inference_steps=1,
            guidance_scale=0.0,
            height=size,
            width=size,
            latents=lat,
            output_type="np",
            **control,
        ).images

    @torch.no_grad()
    def stages():
        """The same work, stage by stage (ms): text encoder, [ControlNet,] UNet, VAE decoder."""
        out = {}
        t = time.perf_counter()
        ids = pipe.tokenizer(
            [PROMPT],
            padding="max_length",
            max_length=pipe.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        states = pipe.text_encoder(ids)[0]
        out["text_encoder"], t = (time.perf_counter() - t) * 1e3, time.perf_counter()
        pipe.scheduler.set_timesteps(1)
        x = lat * pipe.scheduler.init_noise_sigma
        step = pipe.scheduler.timesteps[0]
        sample, residuals = pipe.scheduler.scale_model_input(x, step), {}
        if controlnet:
            image = pipe.control_image_processor.preprocess(control["image"], height=size, width=size)
            down, mid = pipe.controlnet(
                sample, step, encoder_hidden_states=states, controlnet_cond=image, return_dict=False
            )
            residuals = {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}
            out["controlnet_1"], t = (time.perf_counter() - t) * 1e3, time.perf_counter()
        eps = pipe.unet(sample, step, encoder_hidden_states=states, **residuals).sample
        x = pipe.scheduler.step(eps, step, x).prev_sample
        out["unet_1"], t = (time.perf_counter() - t) * 1e3, time.perf_counter()
        pipe.vae.decode(x / pipe.vae.config.scaling_factor)
        out["vae_decoder"] = (time.perf_counter() - t) * 1e3
        return out

    return call, stages


def runtime_candidate(bundle: Path, mode: str, latents: np.ndarray, control: dict):
    from edgegen.runtime import Pipeline

    pipe = Pipeline.from_bundle(bundle, backend="ort-cpu", precision="fp32", mode=mode, cache_size=0)

    def call():
        return pipe(PROMPT, seed=0, latents=latents, output_type="uint8", **control)

    def stages():
        return {k: v / 1e6 for k, v in pipe.last_call.stages.items()}

    return call, stages, pipe


def measure(
    bundle: Path, ckpt: Path, rounds: int, size: int, vae: Path | None = None, controlnet: Path | None = None
) -> dict:
    import json as _json

    manifest = _json.loads((bundle / "manifest.json").read_text())
    shape = tuple(manifest["generation"]["latent_shape"])
    size = manifest["generation"]["image_size"]
    latents = np.random.default_rng(0).standard_normal((1, *shape), dtype=np.float32)
    eager, eager_stages = eager_candidates(ckpt, size, latents, vae, controlnet)
    control = {"control_image": control_image(size)} if controlnet else {}
    fused, _, _ = runtime_candidate(bundle, "fused", latents, control)
    loop, loop_stages, _ = runtime_candidate(bundle, "loop", latents, control)
    names = {"eager": eager, "runtime fused": fused, "runtime loop": loop}
    images = {name: call() for name, call in names.items()}  # warm-up (first runs allocate and pick kernels)
    eager_stages()
    samples = {name: [] for name in names}
    stage_samples = {"eager": [], "runtime loop": []}
    for _ in range(rounds):
        for name, call in names.items():
            t = time.perf_counter()
            call()
            samples[name].append((time.perf_counter() - t) * 1e3)
            if name == "runtime loop":
                stage_samples[name].append(loop_stages())
        stage_samples["eager"].append(eager_stages())
    a = (images["eager"] * 255).round().astype(np.int16)
    result = {
        "image_size": size,
        "rounds": rounds,
        "vae": manifest["generation"].get("vae"),
        "ms": {
            n: {"median": float(np.median(s)), "min": float(np.min(s)), "samples": s}
            for n, s in samples.items()
        },
        "stages_ms": {
            n: {k: float(np.median([s[k] for s in ss])) for k in ss[0]} for n, ss in stage_samples.items()
        },
        "max_pixel_diff_vs_eager": {
            n: int(np.abs(images[n].astype(np.int16) - a).max()) for n in names if n != "eager"
        },
    }
    result["speedup_fused_vs_eager"] = (
        result["ms"]["eager"]["median"] / result["ms"]["runtime fused"]["median"]
    )
    return result


def variants(bundle: Path, rounds: int, baseline: Path | None = None) -> dict:
    """The fused graph alone (engine time) under other ONNX Runtime session settings; with ``baseline``,
    that bundle's fused graph and this one's are timed in turn (A B A B ...) under the default settings."""
    import onnxruntime as ort
    from edgegen.runtime.bundle import NP_DTYPES, Bundle

    b = Bundle.open(bundle)
    path = b.onnx_path("fused", "fp32")
    comp = b.components["fused"]
    feeds = {
        t.name: (np.zeros([1 if isinstance(d, str) else d for d in t.shape], NP_DTYPES[t.dtype]))
        for t in comp.inputs
    }
    feeds["noise"] = np.random.default_rng(0).standard_normal(feeds["noise"].shape, dtype=np.float32)
    configs = {
        "all (default)": {},
        "extended": {"level": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED},
        "basic": {"level": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC},
        "1 thread": {"threads": 1},
        "sequential, no spinning": {"spin": False},
        "no memory arena": {"arena": False},
    }
    out = {}
    if baseline is not None:
        out["ab"] = ab(path, Bundle.open(baseline).onnx_path("fused", "fp32"), feeds, rounds)
    for name, cfg in configs.items():
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.graph_optimization_level = cfg.get("level", ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
        if "threads" in cfg:
            opts.intra_op_num_threads = cfg["threads"]
        if cfg.get("spin") is False:
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if cfg.get("arena") is False:
            opts.enable_cpu_mem_arena = False
        t = time.perf_counter()
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        load = time.perf_counter() - t
        session.run(None, feeds)
        times = []
        for _ in range(rounds):
            t = time.perf_counter()
            session.run(None, feeds)
            times.append((time.perf_counter() - t) * 1e3)
        out[name] = {
            "median_ms": float(np.median(times)),
            "min_ms": float(np.min(times)),
            "session_load_s": load,
        }
        print(
            f"  variant {name:26s} median {out[name]['median_ms']:9.1f} ms  (load {load:.1f} s)", flush=True
        )
        del session
    return out


def ab(path: Path, baseline: Path, feeds: dict, rounds: int) -> dict:
    import onnxruntime as ort
    from edgegen.runtime.backends import session_options

    sessions = {
        "this bundle": ort.InferenceSession(str(path), session_options(), providers=["CPUExecutionProvider"]),
        "baseline": ort.InferenceSession(
            str(baseline), session_options(), providers=["CPUExecutionProvider"]
        ),
    }
    outs = {name: s.run(None, feeds)[0] for name, s in sessions.items()}
    times = {name: [] for name in sessions}
    for _ in range(rounds):
        for name, s in sessions.items():
            t = time.perf_counter()
            s.run(None, feeds)
            times[name].append((time.perf_counter() - t) * 1e3)
    result = {
        name: {"median_ms": float(np.median(v)), "min_ms": float(np.min(v))} for name, v in times.items()
    }
    result["max_pixel_diff"] = int(
        np.abs(outs["this bundle"].astype(np.int16) - outs["baseline"].astype(np.int16)).max()
    )
    print(
        f"  A/B fused graph: this bundle {result['this bundle']['median_ms']:.1f} ms, baseline "
        f"{result['baseline']['median_ms']:.1f} ms (medians), max pixel diff {result['max_pixel_diff']}",
        flush=True,
    )
    return result


def set_threads(n: int) -> None:
    """Both libraries on ``n`` threads: torch's intra-op pool, and every runtime session (EDGEGEN_THREADS)."""
    import torch
    from edgegen.runtime.backends import THREADS_ENV

    torch.set_num_threads(n)
    os.environ[THREADS_ENV] = str(n)


def machine() -> dict:
    import diffusers
    import onnxruntime
    import torch

    cpu = next(
        (line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
        "?",
    )
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "diffusers": diffusers.__version__,
        "onnxruntime": onnxruntime.__version__,
        "numpy": np.__version__,
    }


def report(name: str, r: dict) -> str:
    size = f"{r['image_size']}x{r['image_size']}"
    lines = [f"{name} at {size}, 1 step, {r['rounds']} interleaved rounds (median ms):"]
    for cand, m in r["ms"].items():
        lines.append(f"  {cand:32s} {m['median']:9.1f}  (min {m['min']:.1f})")
    lines.append(
        f"  speedup runtime fused vs eager: {r['speedup_fused_vs_eager']:.2f}x; "
        f"max pixel diff vs eager {r['max_pixel_diff_vs_eager']}"
    )
    for cand, stages in r["stages_ms"].items():
        lines.append(f"  stages {cand}: " + ", ".join(f"{k} {v:.1f}" for k, v in stages.items()))
    return "\n".join(lines)


def versus(taesd: dict, kl: dict) -> dict:
    """End to end and per stage, the AutoencoderTiny bundle against the AutoencoderKL one (medians, ms).
    Measured in separate runs, so the machine's load may differ between them."""
    ms = lambda r, c: r["ms"][c]["median"]  # noqa: E731
    return {
        "end_to_end_ms": {
            c: {"kl": ms(kl, c), "taesd": ms(taesd, c), "speedup": ms(kl, c) / ms(taesd, c)} for c in kl["ms"]
        },
        "stages_ms": {
            c: {
                k: {"kl": kl["stages_ms"][c][k], "taesd": taesd["stages_ms"][c].get(k)}
                for k in kl["stages_ms"][c]
            }
            for c in kl["stages_ms"]
        },
    }


def versus_report(v: dict) -> str:
    lines = ["AutoencoderTiny against AutoencoderKL, end to end (median ms, KL -> TAESD):"]
    for cand, m in v["end_to_end_ms"].items():
        lines.append(f"  {cand:32s} {m['kl']:9.1f} -> {m['taesd']:9.1f}  ({m['speedup']:.2f}x)")
    for cand, stages in v["stages_ms"].items():
        lines.append(
            f"  stages {cand}: "
            + ", ".join(
                f"{k} {s['kl']:.1f} -> {s['taesd']:.1f}" for k, s in stages.items() if s["taesd"] is not None
            )
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--work", default="/tmp/edgegen-sdturbo", help="where the checkpoints and bundles are kept"
    )
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--tiny-rounds", type=int, default=30)
    p.add_argument("--tiny-only", action="store_true")
    p.add_argument("--skip-tiny", action="store_true")
    p.add_argument(
        "--variants", action="store_true", help="also time the fused graph under other session settings"
    )
    p.add_argument(
        "--taesd",
        action="store_true",
        help="also the SD-Turbo architecture with an "
        "AutoencoderTiny (TAESD architecture) VAE, against the AutoencoderKL one",
    )
    p.add_argument(
        "--controlnet",
        action="store_true",
        help="also the SD-Turbo architecture with a ControlNet "
        "(random weights), against diffusers' StableDiffusionControlNetPipeline, per stage",
    )
    p.add_argument(
        "--baseline-bundle",
        help="with --variants: also time this bundle's fused graph (e.g. one "
        "exported before a change), interleaved with this one's",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="threads for both PyTorch and ONNX Runtime (default: "
        "each library's own choice, all cores); 1 is the fairer setting on a machine other jobs keep busy",
    )
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.threads:
        set_threads(args.threads)
    results = {
        "machine": machine(),
        "threads": args.threads or "default",
        "command": "python -m benchmarks.diffusion_cpu "
        + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    print(json.dumps(results["machine"]), flush=True)
    if not args.skip_tiny:
        ckpt, bundle = build(work, args.size, tiny=True)
        results["tiny"] = measure(bundle, ckpt, args.tiny_rounds, args.size)
        print(report("tiny model", results["tiny"]), flush=True)
    if not args.tiny_only:
        ckpt, bundle = build(work, args.size, tiny=False)
        results["sd_turbo"] = measure(bundle, ckpt, args.rounds, args.size)
        print(report("SD-Turbo architecture", results["sd_turbo"]), flush=True)
        if args.taesd:
            taesd = taesd_dir(work)
            ckpt, bundle = build(work, args.size, tiny=False, taesd=taesd)
            results["sd_turbo_taesd"] = measure(bundle, ckpt, args.rounds, args.size, vae=taesd)
            print(report("SD-Turbo architecture, AutoencoderTiny VAE", results["sd_turbo_taesd"]), flush=True)
            results["taesd_vs_kl"] = versus(results["sd_turbo_taesd"], results["sd_turbo"])
            print(versus_report(results["taesd_vs_kl"]), flush=True)
        if args.controlnet:
            controlnet = controlnet_dir(work)
            ckpt, cn_bundle = build(work, args.size, tiny=False, controlnet=controlnet)
            results["sd_turbo_controlnet"] = measure(
                cn_bundle, ckpt, args.rounds, args.size, controlnet=controlnet
            )
            print(
                report("SD-Turbo architecture with a ControlNet", results["sd_turbo_controlnet"]), flush=True
            )
        if args.variants:
            results["sd_turbo"]["variants"] = variants(
                bundle, max(2, args.rounds // 2), Path(args.baseline_bundle) if args.baseline_bundle else None
            )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
