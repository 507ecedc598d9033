"""The `edgegen` command. Runtime commands need only the lean runtime; `export` (and a doctor run
without --bundle) load edgegen.export, which needs the `export` extra."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import sys
import warnings
from pathlib import Path

from .errors import BadInputError, EdgegenError

DEBUG_ENV = "EDGEGEN_DEBUG"


def _export_module(what: str):
    try:
        import edgegen.export as export
    except ImportError as e:
        raise BadInputError(
            what, f"needs the export extra ({e.name} is not installed)", "pip install 'edgegen[export]'"
        ) from None
    return export


def _emit(args, data: dict, text: str) -> None:
    """A command's result: ``data`` (which has "ok") as one JSON object with --json, else ``text``."""
    print(json.dumps(data, indent=2, default=str) if getattr(args, "json", False) else text)


def version() -> str:
    """edgegen's installed version; the package's own where it runs from a source tree without an install."""
    try:
        return importlib.metadata.version("edgegen")
    except importlib.metadata.PackageNotFoundError:
        from . import __version__

        return __version__


# ---------------------------------------------------------------- commands


def cmd_export(args) -> int:
    export = _export_module("edgegen export")
    out = export.export_checkpoint(
        args.checkpoint,
        args.output,
        precisions=args.precision,
        max_batch=args.max_batch,
        overwrite=args.force,
        progress=not args.quiet,
        allow_degraded=args.allow_degraded,
        engines=args.engines,
        compute_capability=args.compute_capability,
        workspace_mb=args.workspace_mb,
        refittable=args.refittable,
        family_options={
            "image_size": args.image_size,
            "vae": args.vae,
            "controlnet": args.controlnet,
            "ip_adapter": args.ip_adapter,
            "loras": _loras(args),
        },
    )
    from .bundle import Bundle

    report = Bundle.open(out).report()
    status = "validated: ok" if report.get("ok") else "DEGRADED: " + "; ".join(report.get("degraded", []))
    _emit(args, {"bundle": str(out), "ok": report.get("ok"), "report": report}, f"wrote {out} ({status})")
    return 0


def _loras(args) -> list[tuple[str, float]] | None:
    """--lora FILE[:SCALE], repeatable."""
    from .lora import parse_spec

    return [parse_spec(text) for text in args.lora] if args.lora else None


def _bundle_path(args) -> Path:
    if args.bundle:
        return Path(args.bundle)
    return Path(_export_module("the default model").default_bundle(progress=not getattr(args, "json", False)))


def cmd_generate(args) -> int:
    from .pipeline import Pipeline, TruncationWarning, UnknownSubjectWarning

    out = Path(args.output)
    if out.suffix.lower() not in (".png", ".jpg", ".jpeg", ".webp", ".bmp"):
        raise BadInputError("-o", f"unknown image extension {out.suffix!r}", "use .png, .jpg, .webp or .bmp")
    pipe = Pipeline.from_bundle(
        _bundle_path(args), backend=args.backend, precision=args.precision, lora=_loras(args)
    )
    options = _diffusion_options(args, pipe)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", TruncationWarning)
        warnings.simplefilter("always", UnknownSubjectWarning)
        images = pipe(args.prompt, seed=args.seed, num_images_per_prompt=args.n, output_type="pil", **options)
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = (
        [out]
        if len(images) == 1
        else [out.with_name(f"{out.stem}_{i}{out.suffix}") for i in range(len(images))]
    )
    for image, path in zip(images, paths):
        image.save(path)
    notes = [str(w.message) for w in caught]
    for note in notes:
        print(f"warning: {note}", file=sys.stderr)
    data = {
        "ok": True,
        "images": [str(p) for p in paths],
        "seeds": pipe.last_call.seeds,
        "backend": pipe.backend,
        "precision": pipe.precision,
        "warnings": notes,
        "read": pipe.last_call.read,  # what the model read from the prompt, per image ([]: not reported)
    }
    reads = pipe.last_call.read or [{} for _ in paths]
    _emit(
        args,
        data,
        "\n".join(
            f"wrote {p} (seed {s}, {pipe.backend} {pipe.precision}){_describe_read(r)}"
            for p, s, r in zip(paths, pipe.last_call.seeds, reads)
        ),
    )
    return 0


def _describe_read(read: dict) -> str:
    """'; drew rocket (p=0.98) on blue (p=1.00), size large (p=0.99)', or '' where nothing was read."""
    if not read:
        return ""
    parts = [f"{v['name']} (p={v['p']:.2f})" for v in read.values()]
    if set(read) == {"subject", "background", "size"}:
        return f"; drew {parts[0]} on {parts[1]}, size {parts[2]}"
    return "; read " + ", ".join(f"{k} {p}" for k, p in zip(read, parts))


# generate's diffusion-only flags and the pipeline keyword each is passed as (diffusers' names)
DIFFUSION_FLAGS = {
    "--steps": "num_inference_steps",
    "--negative-prompt": "negative_prompt",
    "--guidance-scale": "guidance_scale",
    "--scheduler": "scheduler",
    "--image": "image",
    "--strength": "strength",
    "--control-image": "control_image",  # a path: the pipeline reads it (and refuses a bad file)
    "--controlnet-conditioning-scale": "controlnet_conditioning_scale",
    "--ip-adapter-image": "ip_adapter_image",  # a path, as --control-image
    "--ip-adapter-scale": "ip_adapter_scale",
}


def _diffusion_options(args, pipe) -> dict:
    """generate's diffusion-only options, given only when set, as pipeline keywords; refused for other
    families (before the --image file is read)."""
    given = {flag: getattr(args, flag[2:].replace("-", "_")) for flag in DIFFUSION_FLAGS}
    given = {flag: value for flag, value in given.items() if value is not None}
    if given and pipe.bundle.family != "diffusion":
        raise BadInputError(
            ", ".join(given),
            f"only for diffusion bundles; this one is {pipe.bundle.family}",
            "drop these options",
        )
    if "--image" in given:
        given["--image"] = _read_image(given["--image"])
    return {DIFFUSION_FLAGS[flag]: value for flag, value in given.items()}


def _read_image(path: str):
    from PIL import Image, UnidentifiedImageError

    try:
        return Image.open(path).convert("RGB")
    except (OSError, UnidentifiedImageError) as e:
        raise BadInputError("--image", f"cannot read {path}: {e}", "pass a PNG or JPEG file") from None


def cmd_engines(args) -> int:
    from .engine_build import add_engines

    result = add_engines(
        args.bundle,
        args.flavour,
        compute_capability=args.compute_capability,
        workspace_mb=args.workspace_mb,
        progress=not (args.quiet or args.json),
        refittable=args.refittable,
    )
    build = result["build"]
    forms = sorted({e["form"] for e in result["engines"]})
    cache = (
        f"timing cache from the {build['timing_cache_source']} ({build['timing_cache_bytes_before']} bytes)"
        if build["timing_cache_source"]
        else "new timing cache"
    )
    text = (
        f"wrote {len(result['engines'])} engines ({', '.join(forms)}) to {Path(args.bundle) / result['dir']} "
        f"in {build['seconds']:.1f}s; {cache}"
        + (f"; replaced {result['replaced']} older ones" if result["replaced"] else "")
        + "; manifest updated"
    )
    _emit(args, {"ok": True, **result}, text)
    return 0


def cmd_inspect(args) -> int:
    from .bundle import Bundle

    bundle = Bundle.open(args.bundle)
    m = bundle.manifest
    report = bundle.report()
    # ok: the bundle opened (schema, paths, hashes); whether its export validated is report_ok
    data = {"ok": True, "manifest": m, "report_ok": report.get("ok"), "degraded": m.get("degraded", [])}
    lines = [
        f"bundle     {bundle.root}",
        f"schema     {m['schema']}",
        f"family     {m['family']}",
        f"precisions {', '.join(m['precisions'])}",
        f"tokenizer  max_length {m['tokenizer']['max_length']}, pad {m['tokenizer']['pad_token']!r}, "
        f"padding {m['tokenizer'].get('padding', 'max_length')}",
        f"generation {json.dumps(m['generation'])}",
        *_conditioning_lines(m),
        "components:",
    ]
    for name, c in bundle.components.items():
        io = ", ".join(f"{t.name}:{t.dtype}{list(t.shape)}" for t in c.inputs)
        oo = ", ".join(f"{t.name}:{t.dtype}{list(t.shape)}" for t in c.outputs)
        files = ", ".join(f"{p} {m['files'][f]['bytes'] / 1e6:.2f} MB" for p, f in c.files.items())
        lines.append(f"  {name:13s} ({io}) -> ({oo})  [{files}]")
    prov = m.get("provenance", {})
    lines.append("provenance " + ", ".join(f"{k} {v}" for k, v in prov.items()))
    lines.append(f"validated  {'ok' if report.get('ok') else 'NOT ok' if report else 'no report'}")
    for line in m.get("degraded", []):
        lines.append(f"DEGRADED   {line}")
    _emit(args, data, "\n".join(lines))
    return 0


def _conditioning_lines(manifest: dict) -> list[str]:
    """The image-conditioning components a diffusion bundle holds (ControlNet, IP-Adapter), one line each."""
    gen = manifest["generation"] if isinstance(manifest["generation"], dict) else {}
    lines = []
    if gen.get("controlnet"):
        controlnet, config = gen["controlnet"], manifest.get("model", {}).get("controlnet", {})
        lines.append(
            f"controlnet {controlnet.get('class')}, {len(controlnet.get('residuals', []))} residuals, "
            f"conditioning_channels {config.get('conditioning_channels', 3)}, default scale "
            f"{controlnet.get('conditioning_scale')} (generate --control-image)"
        )
    if gen.get("ip_adapter"):
        lines.append(
            f"ip_adapter CLIP image encoder at {gen['ip_adapter'].get('image_size')}px, default scale "
            f"{gen['ip_adapter'].get('scale')} (generate --ip-adapter-image)"
        )
    return lines


def cmd_validate(args) -> int:
    from .backends import resolve_backend
    from .bundle import Bundle
    from .check import check_bundle, failures

    bundle = Bundle.open(_bundle_path(args))
    backend, notes = resolve_backend(args.backend)
    precisions = None if args.precision == "all" else [args.precision]
    report = check_bundle(bundle, backend, precisions)  # adherence too, for a bundle with a judge
    report["bundle"] = str(bundle.root)
    lines = [f"validate {bundle.root} on {backend}"]
    for precision, entry in report["precisions"].items():
        for comp, p in entry["parity"].items():
            limit = "gated by quality" if p["tolerance"] is None else f"tolerance {p['tolerance']:.3g}"
            verdict = "ok" if p["ok"] else "FAIL"
            lines.append(f"  {precision:5s} {comp:13s} max abs {p['max_abs']:.3g} ({limit}) {verdict}")
        for metric, c in entry.get("gate", {}).get("checks", {}).items():
            value = "not measured" if c["value"] is None else f"{c['value']:.4g}"
            lines.append(
                f"  {precision:5s} gate {metric} {value} >= {c['min']} {'ok' if c['ok'] else 'FAIL'}"
            )
        q = entry.get("quality", {})
        if "psnr_db" in q:
            lines.append(f"  {precision:5s} pixels PSNR vs PyTorch fp32: {q['psnr_db']:.1f} dB")
        if "adherence" in q:
            a = q["adherence"]
            lines.append(
                f"  {precision:5s} adherence seen {a['seen']:.3f}, held-out {a['heldout']:.3f}; diversity "
                f"{q['diversity']:.3f}; Frechet judge distance {q['frechet_judge_distance']:.2f}"
            )
    lines += [f"  {f}" for f in failures(report)]
    lines.append("ok" if report["ok"] else "FAILED")
    _emit(args, report, "\n".join(lines))
    return 0 if report["ok"] else 1


def cmd_bench(args) -> int:
    from .bench import format_runs, run_benches
    from .pipeline import Pipeline, check_count

    batch, iterations = check_count(args.batch), check_count(args.iterations)
    if not args.prompt.strip():  # before loading anything
        raise BadInputError("--prompt", "is empty", "give the prompt to time, e.g. --prompt 'a cat'")
    if args.no_cuda_graphs:
        from .backends import CUDA_GRAPHS_ENV

        os.environ[CUDA_GRAPHS_ENV] = "0"
    precisions = args.precision  # a list: _precision_list parsed it
    if len(precisions) > 1 and "auto" in precisions:
        raise BadInputError(
            "--precision", "auto cannot be one of several", "name them, e.g. --precision int8,fp32"
        )
    options = {"mode": args.mode} if args.mode else {}
    pipes = {
        p: Pipeline.from_bundle(_bundle_path(args), backend=args.backend, precision=p, **options)
        for p in precisions
    }
    timing = dict(
        batch=batch, iterations=iterations, warmup=args.warmup, seconds=args.seconds, prompt=args.prompt
    )
    result = {"ok": True, **run_benches(pipes, **timing)}  # one shape for one or several precisions
    _emit(args, result, format_runs(result))
    return 0


def cmd_doctor(args) -> int:
    from .doctor import run_doctor

    bundle = args.bundle
    tmp = build_error = None
    if bundle is None:
        try:
            export = _export_module("doctor")
        except BadInputError:
            export = None
        if export is not None:
            import tempfile

            tmp = tempfile.TemporaryDirectory(prefix="edgegen-doctor-")
            from edgegen.export.testing import make_tiny_checkpoint

            from .backends import ENGINE_FLAVOURS, backend_loads

            ckpt = make_tiny_checkpoint(Path(tmp.name) / "ckpt")
            # engines too, for a TensorRT flavour that loads here, so its parity is checked as well
            flavour = next((f for f in ENGINE_FLAVOURS if backend_loads(f)[0]), None)
            try:
                bundle = export.export_checkpoint(
                    ckpt, Path(tmp.name) / "bundle", progress=False, engines=flavour
                )
            except EdgegenError as e:
                if flavour is None:
                    raise
                build_error = f"engines for {flavour} could not be built: {e}"
                bundle = export.export_checkpoint(ckpt, Path(tmp.name) / "bundle", progress=False)
    try:
        report = run_doctor(bundle)
    finally:
        if tmp is not None:
            tmp.cleanup()
    if build_error:
        report["notes"].append(build_error)
    lines = [f"{k:14s} {v}" for k, v in report["versions"].items()]
    lines.append(
        f"{'providers':14s} listed: {', '.join(report['providers_listed'])}; a session really gets: "
        + (", ".join(p for p, ok in report["providers_loaded"].items() if ok) or "none")
    )
    gpu = report["gpu"]
    lines.append(
        f"{'gpu':14s} "
        + (
            "; ".join(
                f"{d['name'] or 'GPU'} {d['index']}, compute capability {d['compute_capability']}"
                for d in gpu.get("devices", [])
            )
            + f" (driver supports CUDA {gpu.get('driver_supports_cuda')}, "
            f"libcudart {gpu.get('cuda_runtime')})"
            if gpu["available"]
            else f"none ({gpu['error']})"
        )
    )
    for flavour, t in report["tensorrt"].items():
        lines.append(
            f"{flavour:14s} " + (f"{t['module']} {t['version']}" if t["module"] else f"no ({t['error']})")
        )
    for name, b in report["backends"].items():
        status = "ok" if b["ok"] else "unavailable" if not b.get("loads") else "FAIL"
        diff = (
            ""
            if b["max_abs_pixel_diff"] is None
            else f", max pixel diff vs PyTorch {b['max_abs_pixel_diff']:g}"
        )
        lines.append(f"  {name:9s} {status}{diff}{'' if not b['error'] else '  (' + b['error'] + ')'}")
    lines += [f"note: {n}" for n in report["notes"]]
    lines.append("ok" if report["ok"] else "NOT ok")
    _emit(args, report, "\n".join(lines))
    return 0 if report["ok"] else 1


def cmd_serve(args) -> int:
    try:  # the serve extra: ray is imported here only, never by the runtime
        import edgegen.serve as serving
    except ImportError as e:
        raise BadInputError(
            "edgegen serve",
            f"needs the serve extra ({e.name} is not installed)",
            "pip install 'edgegen[serve]'",
        ) from None
    config = serving.ServeConfig(
        bundle=str(_bundle_path(args)),
        host=args.host,
        port=args.port,
        replicas=args.replicas,
        max_batch=args.max_batch,
        batch_wait_ms=args.batch_wait_ms,
        backend=args.backend,
        precision=args.precision,
        cors=args.cors,
        timeout_s=args.timeout_s,
        max_queued=args.max_queued,
        cpus_per_replica=args.cpus_per_replica,
        gpus_per_replica=args.gpus_per_replica,
    )
    from .bundle import Bundle

    Bundle.open(config.bundle)  # a bad bundle is refused here, not by each replica inside Ray
    serving.serve_forever(config, address=args.address)
    return 0


# ---------------------------------------------------------------- parser


class UsageError(Exception):
    """A command line argparse refuses; main prints it as argparse would, or as JSON with --json."""

    def __init__(self, parser: argparse.ArgumentParser, message: str):
        super().__init__(message)
        self.parser, self.message = parser, message


class _Parser(argparse.ArgumentParser):
    """argparse's parser (its sub-parsers are of this class too), with usage errors raised to main
    instead of printed here, so that --json can answer them in JSON."""

    def error(self, message: str):
        raise UsageError(self, message)


def _precision_list(allowed: tuple):
    """An argparse type: a comma-separated list of ``allowed`` precisions, in order, without repeats."""

    def parse(text: str) -> list[str]:
        items = list(dict.fromkeys(p.strip() for p in text.split(",") if p.strip()))
        bad = [p for p in items if p not in allowed]
        if not items or bad:
            raise argparse.ArgumentTypeError(
                f"unknown precision(s) {', '.join(bad) or repr(text)}; "
                f"choose from {', '.join(allowed)}, comma-separated"
            )
        return items

    return parse


def _add_bundle(parser: argparse.ArgumentParser, positional: bool, required: bool, what: str = "") -> None:
    """The bundle of a command that reads one: --bundle B everywhere, and also a positional BUNDLE where
    DESIGN.md gives one. _given_bundle makes them one ``args.bundle``."""
    what = what or "bundle directory" + ("" if required else " (default: the shipped default model)")
    if positional:
        parser.add_argument("bundle_positional", nargs="?", metavar="BUNDLE", help=what)
    parser.add_argument("--bundle", help=what + (" (the same as BUNDLE)" if positional else ""))
    parser.set_defaults(bundle_required=required)


def _given_bundle(args) -> None:
    """``args.bundle``: the bundle given as BUNDLE or as --bundle; both is fine if they name the same."""
    if not hasattr(args, "bundle"):  # a command that reads no bundle (export writes one)
        return
    positional = getattr(args, "bundle_positional", None)
    if positional is not None:
        if args.bundle is not None and Path(args.bundle).resolve() != Path(positional).resolve():
            raise BadInputError(
                "--bundle",
                f"two different bundles given: {positional} and --bundle {args.bundle}",
                "give the bundle once, as BUNDLE or as --bundle",
            )
        args.bundle = positional
    if args.bundle is None and getattr(args, "bundle_required", False):
        raise BadInputError(
            f"edgegen {args.command}",
            "needs a bundle",
            f"give it as `edgegen {args.command} BUNDLE` or `--bundle BUNDLE`",
        )


def build_parser() -> argparse.ArgumentParser:
    from .backends import BACKENDS, ENGINE_FLAVOURS
    from .bench import DEFAULT_PROMPT as DEFAULT_BENCH_PROMPT
    from .bundle import PRECISIONS
    from .diffusion import MODES as DIFFUSION_MODES
    from .gan import MODES as GAN_MODES
    from .schedulers import NAMES as SCHEDULERS

    modes = tuple(dict.fromkeys(GAN_MODES + DIFFUSION_MODES))  # a family refuses the other's
    p = _Parser(
        prog="edgegen",
        description="Export text-to-image models to validated ONNX/TensorRT "
        "bundles and run them with a lean runtime.",
    )
    p.add_argument("--version", action="version", version=f"edgegen {version()}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    e = sub.add_parser(
        "export",
        help="checkpoint -> validated bundle",
        description="Trace a checkpoint (gan: "
        "text_encoder/ + generator/; diffusion: a diffusers pipeline directory) to ONNX, check every graph "
        "against PyTorch, and write a bundle directory atomically (nothing is left at -o if any step fails).",
    )
    e.add_argument("checkpoint", help="checkpoint directory")
    e.add_argument("-o", "--output", required=True, help="bundle directory to create")
    e.add_argument(
        "--precision",
        default="fp32",
        type=_precision_list(PRECISIONS),
        help="comma-separated: fp32,fp16,int8 (fp32 is always included)",
    )
    e.add_argument(
        "--max-batch", type=int, default=16, help="largest batch the runtime may ask for (default 16)"
    )
    e.add_argument(
        "--engines",
        choices=ENGINE_FLAVOURS,
        help="also build TensorRT engines from the fp16/int8 "
        "files, as `edgegen engines` does (trt: on the target GPU; trt-rtx: TensorRT for RTX, may build "
        "ahead of time). On a device without torch, export here and run `edgegen engines` there",
    )
    e.add_argument(
        "--compute-capability",
        help="GPU architecture to build engines for, e.g. 8.9 (default: the GPU "
        "present; trt-rtx can target one that is absent)",
    )
    e.add_argument(
        "--workspace-mb", type=int, default=2048, help="TensorRT builder memory limit (default 2048)"
    )
    e.add_argument(
        "--refittable",
        action="store_true",
        help="with --engines: build engines whose weights can be replaced after loading, so "
        "generate --lora works on them (not verified on a GPU)",
    )
    e.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="diffusion: image size the graphs are built for "
        "(default: the UNet's sample size x the VAE factor, e.g. 512 for SD-Turbo)",
    )
    e.add_argument(
        "--vae",
        default=None,
        help="diffusion: an autoencoder directory (AutoencoderTiny or "
        "AutoencoderKL, saved with save_pretrained) to use instead of the pipeline's own vae/, "
        "e.g. a TAESD for a faster decoder",
    )
    e.add_argument(
        "--lora",
        action="append",
        metavar="FILE[:SCALE]",
        help="diffusion: fuse a LoRA (.safetensors, diffusers/PEFT or kohya naming) into the UNet and "
        "text encoder before export, at SCALE (default 1); repeat for several",
    )
    e.add_argument(
        "--controlnet",
        default=None,
        help="diffusion: a ControlNetModel directory (saved with save_pretrained) to export with the "
        "pipeline (in place of its own controlnet/, if any)",
    )
    e.add_argument(
        "--ip-adapter",
        default=None,
        help="diffusion: an IP-Adapter directory in diffusers' load_ip_adapter layout (image_encoder/ "
        "and ip-adapter.safetensors) to export with the pipeline",
    )
    e.add_argument("--force", action="store_true", help="replace an existing bundle at -o")
    e.add_argument(
        "--allow-degraded",
        action="store_true",
        help="keep a bundle whose fp16/int8 files fail their quality gate (marked degraded)",
    )
    e.add_argument("--quiet", action="store_true", help="no progress output")
    e.add_argument("--json", action="store_true", help="print the result as JSON")
    e.set_defaults(func=cmd_export)

    g = sub.add_parser(
        "generate",
        help="prompt -> image(s)",
        description="Generate images from a prompt with a bundle "
        "(the shipped default model when --bundle is not given).",
    )
    g.add_argument("prompt")
    _add_bundle(g, positional=False, required=False)
    g.add_argument(
        "--seed",
        type=int,
        default=None,
        help="seed of the first image; image i uses seed+i (default: random)",
    )
    g.add_argument("-n", type=int, default=1, help="number of images (default 1)")
    g.add_argument("--precision", default="auto", choices=("auto", *PRECISIONS), help="default auto")
    g.add_argument("--backend", default="auto", choices=BACKENDS, help="default auto")
    g.add_argument(
        "-o", "--output", required=True, help="image path; with -n K > 1, OUT_0.png ... OUT_{K-1}.png"
    )
    g.add_argument(
        "--steps", type=int, default=None, help="diffusion: denoising steps (default: the bundle's)"
    )
    g.add_argument(
        "--negative-prompt", default=None, help="diffusion: what to steer away from (needs guidance)"
    )
    g.add_argument(
        "--guidance-scale", type=float, default=None, help="diffusion: classifier-free guidance (0: none)"
    )
    g.add_argument("--scheduler", default=None, choices=SCHEDULERS, help="diffusion (default: the bundle's)")
    g.add_argument("--image", default=None, help="diffusion: input image for image-to-image")
    g.add_argument(
        "--strength",
        type=float,
        default=None,
        help="diffusion image-to-image: how much to change (0..1, default 0.5)",
    )
    g.add_argument(
        "--lora",
        action="append",
        metavar="FILE[:SCALE]",
        help="diffusion: merge a LoRA (.safetensors) into the weights at load, at SCALE (default 1); "
        "repeat for several. fp32/fp16, on the ONNX Runtime backends and on TensorRT engines built "
        "--refittable (the latter not verified on a GPU)",
    )
    g.add_argument(
        "--control-image",
        default=None,
        help="diffusion with a ControlNet: the condition image (edges, depth...)",
    )
    g.add_argument(
        "--controlnet-conditioning-scale",
        type=float,
        default=None,
        help="diffusion with a ControlNet: how strongly the condition steers (default 1.0; 0: off)",
    )
    g.add_argument(
        "--ip-adapter-image", default=None, help="diffusion with an IP-Adapter: the reference image"
    )
    g.add_argument(
        "--ip-adapter-scale",
        type=float,
        default=None,
        help="diffusion with an IP-Adapter: weight of the reference image (default 1.0; 0: off)",
    )
    g.add_argument("--json", action="store_true", help="print the result as JSON")
    g.set_defaults(func=cmd_generate)

    n = sub.add_parser(
        "engines",
        help="build TensorRT engines for a bundle, on the target machine",
        description="Build strongly typed TensorRT engines from a bundle's fp16 / int8 ONNX files (fp32 "
        "if it has nothing else) and record them in its manifest, with the lean runtime alone (no "
        "torch). Run it on the machine that will run them: engines belong to one TensorRT version and "
        "one GPU. The bundle is updated atomically: a failed or interrupted build leaves it as it was; "
        "engines of the same flavour, version and GPU are replaced.",
    )
    _add_bundle(n, positional=True, required=True)
    n.add_argument(
        "--flavour",
        required=True,
        choices=ENGINE_FLAVOURS,
        help="trt: TensorRT (e.g. JetPack's, on a Jetson); trt-rtx: TensorRT for RTX",
    )
    n.add_argument(
        "--compute-capability",
        help="GPU architecture to build for, e.g. 8.9 (default: the GPU present; "
        "only trt-rtx can target one that is absent)",
    )
    n.add_argument(
        "--workspace-mb", type=int, default=2048, help="TensorRT builder memory limit (default 2048)"
    )
    n.add_argument(
        "--refittable",
        action="store_true",
        help="engines whose weights can be replaced after loading (LoRAs merged at load: "
        "generate --lora, Pipeline.from_bundle(lora=...); not verified on a GPU)",
    )
    n.add_argument("--quiet", action="store_true", help="no progress output")
    n.add_argument("--json", action="store_true", help="print the result as JSON")
    n.set_defaults(func=cmd_engines)

    i = sub.add_parser(
        "inspect",
        help="show a bundle's manifest",
        description="Verify a bundle (schema, paths, "
        "hashes) and show its components, precisions, tokenizer and provenance.",
    )
    _add_bundle(i, positional=True, required=True)
    i.add_argument("--json", action="store_true", help="print the manifest as JSON")
    i.set_defaults(func=cmd_inspect)

    v = sub.add_parser(
        "validate",
        help="re-check a bundle against its PyTorch reference on this device",
        description="Run every component on the bundle's stored PyTorch reference inputs on this "
        "machine and backend, and compare (no torch needed). On trt / trt-rtx the components run "
        "through the bundle's engines for this machine (the precisions that have engines; build them "
        "with `edgegen engines`). Exit 1 if a check fails.",
    )
    _add_bundle(v, positional=True, required=False)
    v.add_argument("--backend", default="auto", choices=BACKENDS, help="default auto")
    v.add_argument("--precision", default="all", choices=("all", *PRECISIONS), help="default all")
    v.add_argument("--json", action="store_true", help="print the report as JSON")
    v.set_defaults(func=cmd_validate)

    b = sub.add_parser(
        "bench",
        help="latency on this device",
        description="Time pipeline calls on this device: "
        "p50/p95/p99 end to end, per stage, time inside engine calls, the runtime's own overhead, "
        "repeated-prompt calls (cached text states), images/s and peak memory.",
    )
    _add_bundle(b, positional=True, required=False)
    b.add_argument(
        "--precision",
        default="auto",
        type=_precision_list(("auto", *PRECISIONS)),
        help="auto, fp32, fp16 or int8; several, comma-separated (e.g. "
        "int8,fp32), are timed interleaved in one process (blocks of 20 calls taking turns), with each "
        "one's end-to-end ratio to fp32 from that same run",
    )
    b.add_argument("--backend", default="auto", choices=BACKENDS, help="default auto")
    b.add_argument("--batch", type=int, default=1, help="images per call (default 1)")
    b.add_argument("--iterations", type=int, default=100, help="timed calls (default 100)")
    b.add_argument("--warmup", type=int, default=10, help="untimed calls first (default 10)")
    b.add_argument("--seconds", type=float, default=None, help="time budget instead of --iterations")
    b.add_argument(
        "--prompt",
        default=DEFAULT_BENCH_PROMPT,
        help=f"the prompt of every call (default {DEFAULT_BENCH_PROMPT!r}); on ONNX Runtime CPU a call "
        "costs its prompt's token count (the JSON's sequence field)",
    )
    b.add_argument(
        "--mode",
        default=None,
        choices=modes,
        help="pipeline path: auto (default), fused, or stage by stage "
        "(gan: split; diffusion: loop, which times the text encoder, each UNet step and the VAE)",
    )
    b.add_argument(
        "--no-cuda-graphs",
        action="store_true",
        help="GPU backends: run without CUDA graph capture (to compare; same as EDGEGEN_CUDA_GRAPHS=0)",
    )
    b.add_argument("--json", action="store_true", help="print one JSON object")
    b.set_defaults(func=cmd_bench)

    d = sub.add_parser(
        "doctor",
        help="what runs here, and does it match PyTorch",
        description="Report versions and which backends really load, then generate on every usable "
        "backend and compare pixels with PyTorch's (a tiny model exported on the spot, or --bundle).",
    )
    _add_bundle(
        d,
        positional=False,
        required=False,
        what="check with this bundle instead of a tiny export (no torch needed)",
    )
    d.add_argument("--json", action="store_true", help="print the report as JSON")
    d.set_defaults(func=cmd_doctor)

    s = sub.add_parser(
        "serve",
        help="HTTP service + live web page on Ray Serve (extra serve)",
        description="Serve a bundle over HTTP on Ray Serve: POST /v1/images/generations (the "
        "OpenAI images API shape plus the pipeline's options), GET /v1/health, "
        "/v1/info, /metrics, and a live page at /. Concurrent requests are batched; a full "
        "queue answers 503 with Retry-After. Starts a local Ray cluster, or joins one with "
        "--address. docs/serving.md has the details.",
    )
    _add_bundle(s, positional=True, required=False)
    s.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind (default 127.0.0.1: this machine only; the service has no authentication)",
    )
    s.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    s.add_argument("--replicas", type=int, default=1, help="generator replicas, each with its own pipeline")
    s.add_argument(
        "--max-batch",
        type=int,
        default=8,
        help="requests gathered into one pipeline call (default 8; 1: no batching)",
    )
    s.add_argument(
        "--batch-wait-ms", type=float, default=5.0, help="how long a batch waits to fill (default 5)"
    )
    s.add_argument("--backend", default="auto", choices=BACKENDS, help="default auto")
    s.add_argument("--precision", default="auto", choices=("auto", *PRECISIONS), help="default auto")
    s.add_argument(
        "--cors",
        metavar="ORIGIN",
        default=None,
        help="allow browser pages from ORIGIN to call the API (default: no CORS headers)",
    )
    s.add_argument("--timeout-s", type=float, default=30.0, help="each request's deadline (default 30)")
    s.add_argument(
        "--max-queued",
        type=int,
        default=64,
        help="requests waiting beyond the running ones; more get 503 with Retry-After at once (default 64)",
    )
    s.add_argument(
        "--cpus-per-replica", type=float, default=0.5, help="Ray's CPU share of a replica (default 0.5)"
    )
    s.add_argument(
        "--gpus-per-replica", type=float, default=0.0, help="GPU backends: 1 gives each replica a GPU"
    )
    s.add_argument(
        "--address",
        default=None,
        help="a running Ray cluster to join (e.g. auto, or HEAD:6379); default: start a local one",
    )
    s.set_defaults(func=cmd_serve)
    return p


def _fail(json_mode: bool, code: int, kind: str, subject: str, message: str, note: str = "") -> int:
    """An error's answer: with --json one object on stdout, {"ok": false, "error": {kind, subject, message,
    note}} (kind: the error class's name), else `edgegen: subject | message. Note: note` on stderr."""
    if json_mode:
        error = {"kind": kind, "subject": subject, "message": message, "note": note}
        print(json.dumps({"ok": False, "error": error}, indent=2, default=str))
    else:
        print(f"edgegen: {subject} | {message}" + (f". Note: {note}" if note else ""), file=sys.stderr)
    return code


def _usage_failure(json_mode: bool, e: UsageError) -> int:
    """argparse's usage error: as argparse prints it (usage line, then `prog: error: ...`), or as JSON."""
    if json_mode:
        return _fail(True, 2, "UsageError", e.parser.prog, e.message, f"see `{e.parser.prog} --help`")
    e.parser.print_usage(sys.stderr)
    print(f"{e.parser.prog}: error: {e.message}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    words = sys.argv[1:] if argv is None else [str(a) for a in argv]
    json_mode = "--json" in words  # known before parsing, so that a usage error can answer in JSON too
    try:
        args = build_parser().parse_args(words)
    except UsageError as e:
        return _usage_failure(json_mode, e)
    try:
        _given_bundle(args)
        return args.func(args)
    except EdgegenError as e:
        return _fail(json_mode, e.exit_code, type(e).__name__, e.subject, e.problem, e.note)
    except KeyboardInterrupt:
        if json_mode:
            _fail(True, 130, "Interrupted", "edgegen", "interrupted")
        else:
            print("edgegen: interrupted", file=sys.stderr)
        if argv is None:  # the command line, not a caller in Python: exit now, with 130.
            # Interpreter shutdown after an interrupt mid-export (torch / ONNX Runtime state) sometimes
            # ended the process by SIGINT instead (about 1 run in 12); the work is already cleaned up
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(130)
        return 130
    except Exception as e:  # a bug: say so in one line; the traceback is one variable away
        if os.environ.get(DEBUG_ENV):
            raise
        return _fail(
            json_mode,
            1,
            "InternalError",
            "internal error",
            f"{type(e).__name__}: {e}",
            f"rerun with {DEBUG_ENV}=1 for the traceback and report it",
        )


if __name__ == "__main__":
    sys.exit(main())
