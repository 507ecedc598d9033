"""``edgegen export``: checkpoint -> validated bundle, written atomically."""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import platform
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from edgegen.runtime import __version__
from edgegen.runtime.backends import ENGINE_FLAVOURS, flavour_choices
from edgegen.runtime.bundle import FORMS, MANIFEST, PRECISIONS, SCHEMA, Bundle, file_entry
from edgegen.runtime.check import (REFERENCE, check_bundle, failures, pooled_cosine, psnr_db,
                                   save_reference)
from edgegen.runtime.errors import BadInputError, ValidationFailedError
from edgegen.runtime.tokenize import PromptTokenizer

from . import int8
from .families import load_family
from .int8 import keep_back
from .weights import share_weights
from .onnx_export import EXTERNAL_SUFFIX, OPSET, export_component
from .progress import Steps

DEFAULT_MAX_BATCH = 16


def parse_precisions(text: str | list[str]) -> list[str]:
    items = [p.strip() for p in (text.split(",") if isinstance(text, str) else text) if p.strip()]
    bad = [p for p in items if p not in PRECISIONS]
    if not items or bad:
        raise BadInputError("--precision", f"unknown precision(s): {bad or text!r}",
                            f"give a comma-separated list of {', '.join(PRECISIONS)}")
    if "fp32" not in items:
        items.insert(0, "fp32")  # the reference every other precision is measured against
    return sorted(set(items), key=PRECISIONS.index)


def export_checkpoint(checkpoint: str | os.PathLike, output: str | os.PathLike, precisions="fp32",
                      max_batch: int = DEFAULT_MAX_BATCH, overwrite: bool = False, progress: bool = True,
                      allow_degraded: bool = False, gates: dict | None = None, engines: str | None = None,
                      compute_capability: str | None = None, workspace_mb: int = 2048,
                      family_options: dict | None = None) -> Path:
    """Export ``checkpoint`` to the bundle directory ``output``; returns its path.

    ``family_options`` go to the checkpoint's family (diffusion: ``image_size``, ``fused_steps``,
    ``num_steps``, ``guidance_scale``).

    Every precision besides fp32 must pass its quality gate (``GATES``, or ``gates`` to override) against
    PyTorch fp32, or the export fails; ``allow_degraded`` keeps such a bundle and marks it degraded.

    Writes into a temporary directory beside ``output`` and renames it into place only when every
    check passed: an interrupted or failed export leaves nothing at ``output``.
    """
    precisions = parse_precisions(precisions)
    out = Path(output)
    if out.exists() and not overwrite:
        raise BadInputError(f"output {out}", "already exists", "choose another path or pass --force to replace it")
    if not isinstance(max_batch, int) or max_batch < 1:
        raise BadInputError("max_batch", f"expected a positive integer, got {max_batch!r}", "use e.g. 16")
    out.parent.mkdir(parents=True, exist_ok=True)
    if engines is not None and engines not in ENGINE_FLAVOURS:
        raise BadInputError("--engines", f"unknown engine flavour {engines!r}", f"use {flavour_choices()}")
    if engines:  # fail now, not after the long steps
        from edgegen.runtime.engine_build import check_options, target_capability
        from edgegen.runtime.engines import import_flavour
        check_options(engines, compute_capability, workspace_mb)
        import_flavour(engines)
        target_capability(engines, compute_capability)
    steps = Steps(["load checkpoint", "PyTorch reference", "trace to ONNX", "convert precisions", "validate parity",
                   "write bundle", *(["build engines"] if engines else [])], progress)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    tmp.chmod(0o755)
    try:
        with steps.step("load checkpoint"):
            family = load_family(Path(checkpoint), **(family_options or {}))
            family.check_precisions(precisions)
            (tmp / "onnx").mkdir()
            settings = family.tokenizer_settings()
            (tmp / settings["file"]).write_text(family.tokenizer_json(), encoding="utf-8")
            for rel, source in family.extra_files().items():
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source, tmp / rel)
            tokenize = PromptTokenizer.from_settings(tmp / settings["file"], settings)
            components = family.components()
        with steps.step("PyTorch reference"):
            cases = [{"in": inputs, "out": _torch_outputs(components, inputs), "meta": meta}
                     for inputs, meta in family.reference_cases(tokenize)]
            save_reference(tmp / REFERENCE, cases)
        with steps.step("trace to ONNX", total=len(components)) as bar, family.tracing():
            sample = max((c["in"] for c in cases), key=lambda c: len(c["input_ids"]))
            files = {}
            for comp in components:
                rel = f"onnx/{comp.name}.fp32.onnx"
                if comp.assemble is not None:
                    comp.assemble({name: tmp / f["fp32"] for name, f in files.items()}, tmp / rel)
                else:
                    export_component(comp, sample, tmp / rel)
                files[comp.name] = {"fp32": rel}
                bar.update(1)
        forms = [f for p in precisions[1:] for f in FORMS[p]]
        all_gates = {**GATES, **(gates or {})}
        quantization = {}
        with steps.step("convert precisions", total=len(forms)) as bar:
            for form in forms:
                if form == "fp16":
                    for comp in components:
                        files[comp.name][form] = _write_form(tmp, files[comp.name]["fp32"], comp, form, _fp16)
                else:
                    calibration = [c for c, _ in family.calibration_cases(tokenize)]
                    kept, alone = keep_back(tmp / files["fused"]["fp32"], form, calibration,
                                           lambda path: score_fused(path, cases), all_gates[form])
                    quantize_with = lambda src, dst, form=form, kept=kept: int8.quantize(src, dst, form, calibration, kept)
                    for comp in components:
                        files[comp.name][form] = _write_form(tmp, files[comp.name]["fp32"], comp, form, quantize_with)
                    quantization[form] = {
                        "calibration_prompts": sum(len(c["input_ids"]) for c in calibration),
                        "kept_back": {b: "activations kept in float, weights int8: when it alone was quantized "
                                         + ", ".join(f"{m} {v:g}" for m, v in alone[b].items())
                                         + "; kept back, worst first, until the gate passed" for b in sorted(kept)},
                        "when_quantized_alone": alone}
                bar.update(1)
        for precision in precisions:  # one weights file per precision, each distinct tensor stored once
            rels = sorted({files[c.name][f] for c in components for f in FORMS[precision]})
            share_weights(tmp, rels, f"onnx/weights.{precision}.bin")
        for stale in (tmp / "onnx").glob(f"*{EXTERNAL_SUFFIX}"):  # a >2 GB graph's own weights, now in the shared file
            stale.unlink()
        manifest = _manifest(family, components, files, settings, max_batch, Path(checkpoint))
        manifest["precisions"] = precisions
        manifest["gates"] = {f: dict(g) for f, g in all_gates.items() if f in ["fp32", *forms]}
        if "quality" in manifest:  # a judge ships with the model: prompt adherence is gated too
            for form, gate in manifest["gates"].items():
                gate.setdefault("adherence_vs_fp32", ADHERENCE_GATES[form.split("-")[0]])
        manifest["files"] = {rel: file_entry(tmp, rel) for rel in _listed(tmp)}
        with steps.step("validate parity"):
            report = check_bundle(Bundle(tmp, manifest), "ort-cpu", precisions)
            report["tokenizer"] = _tokenizer_agreement(family, tokenize)
            report["quantization"] = quantization
            report["ok"] = report["ok"] and report["tokenizer"]["ok"]
            report["created"] = manifest["provenance"]["export_date"]
        parity_ok = report["tokenizer"]["ok"] and all(
            p["ok"] for e in report["precisions"].values() for p in e["parity"].values())
        if not parity_ok:
            lines = failures(report) or [f"tokenizer: {report['tokenizer']}"]
            raise ValidationFailedError(f"export {checkpoint}", "ONNX disagrees with PyTorch: " + "; ".join(lines),
                                        "this is a bug in the export of this model; report it with the checkpoint's config")
        if not report["ok"]:
            lines = failures(report)
            if not allow_degraded:
                raise ValidationFailedError(f"export {checkpoint}", "failed: " + "; ".join(lines),
                                            "drop that precision, or pass --allow-degraded to keep a bundle marked degraded")
            report["degraded"] = manifest["degraded"] = lines
        with steps.step("write bundle"):
            (tmp / "report.json").write_text(json.dumps(report, indent=2))
            manifest["files"] = {rel: file_entry(tmp, rel) for rel in _listed(tmp)}
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        if engines:  # what `edgegen engines` does to a finished bundle, here before it is moved into place
            with steps.step("build engines"):
                from edgegen.runtime.engine_build import add_engines
                add_engines(tmp, engines, compute_capability, workspace_mb, progress)
        _move_into_place(tmp, out)
        return out
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# Quality gates against PyTorch fp32, on the family's validation prompts and seeds (minimums).
GATES = {"fp16": {"psnr_db": 35.0, "text_cosine": 0.999},
         "int8": {"psnr_db": 25.0, "text_cosine": 0.98},
         "int8-qdq": {"psnr_db": 25.0, "text_cosine": 0.98}}


# With a judge: the most adherence (seen or held-out, fraction) a precision may lose against fp32.
ADHERENCE_GATES = {"fp16": -0.005, "int8": -0.02}


def _fp16(src: Path, dst: Path) -> None:
    import onnx
    from .fp16 import convert_to_fp16
    onnx.save(convert_to_fp16(onnx.load(str(src))), str(dst))


def _write_form(tmp: Path, fp32_rel: str, comp, form: str, convert) -> str:
    """Write ``comp`` in ``form``; components that are not quantized (the judge) share the fp32 file."""
    if not comp.quantize:
        return fp32_rel
    rel = f"onnx/{comp.name}.{form}.onnx"
    convert(tmp / fp32_rel, tmp / rel)
    return rel


def score_fused(path: Path, cases: list[dict]) -> dict:
    """Gate metrics of a candidate fused graph on the reference cases: pixel PSNR and pooled text cosine."""
    import onnxruntime as ort
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got, want, cosines = [], [], []
    for case in cases:
        pixels, states = session.run(["pixels", "text_states"], {k: case["in"][k] for k in ("input_ids", "attention_mask", "noise")})
        got.append(pixels.ravel())
        want.append(case["out"]["fused"]["pixels"].ravel())
        cosines.append(pooled_cosine(states, case["out"]["fused"]["text_states"], case["in"]["attention_mask"]))
    return {"psnr_db": psnr_db(np.concatenate(got), np.concatenate(want)), "text_cosine": float(np.min(np.concatenate(cosines)))}


@torch.no_grad()
def _torch_outputs(components, inputs: dict[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    outs = {}
    for comp in components:
        result = comp.module(*(torch.from_numpy(inputs[t.name]) for t in comp.inputs))
        result = result if isinstance(result, tuple) else (result,)
        outs[comp.name] = {t.name: r.numpy() for t, r in zip(comp.outputs, result)}
    return outs


def _tokenizer_agreement(family, tokenize) -> dict:
    """The runtime's tokenizer must produce the ids transformers produces for the same prompts."""
    prompts = family.validation_prompts() + ["word " * 200]
    ours = tokenize(prompts)
    theirs = family.hf_tokenizer(prompts, padding="max_length", truncation=True,
                                 max_length=tokenize.max_length, return_tensors="np")
    same = bool(np.array_equal(ours.input_ids, theirs["input_ids"])
                and np.array_equal(ours.attention_mask, theirs["attention_mask"]))
    return {"ok": same, "prompts": len(prompts), "truncation_reported": bool(ours.truncated[-1])}


def _manifest(family, components, files, settings, max_batch, checkpoint: Path) -> dict:
    import onnx
    import onnxruntime
    import transformers
    return {
        "schema": SCHEMA,
        "family": family.name,
        "components": {c.name: {"inputs": [t.to_json() for t in c.inputs], "outputs": [t.to_json() for t in c.outputs],
                                "files": files[c.name], "tolerance": {"fp32": c.tolerance}} for c in components},
        "tokenizer": settings,
        "generation": family.generation(max_batch),
        "model": family.describe(),
        "engines": [],
        **family.manifest_extras(),
        "provenance": {
            "checkpoint": checkpoint.name, "checkpoint_sha256": checkpoint_hash(checkpoint),
            "edgegen": __version__, "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "transformers": transformers.__version__, "opset": OPSET,
            "python": platform.python_version(), "machine": platform.machine(),
            "export_date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        },
    }


def checkpoint_hash(root: Path) -> str:
    """sha256 over every file of the checkpoint (relative path + content), in a stable order."""
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(file_entry(root, path.relative_to(root).as_posix())["sha256"].encode())
    return digest.hexdigest()


def _listed(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and p.name != MANIFEST)


def _move_into_place(tmp: Path, out: Path) -> None:
    if out.exists():  # --force: swap, so a crash never leaves neither bundle
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)
