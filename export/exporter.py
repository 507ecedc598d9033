"""``edgegen export``: checkpoint -> validated bundle, written atomically."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import platform
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from edgegen.runtime import __version__
from edgegen.runtime.backends import ENGINE_FLAVOURS, flavour_choices
from edgegen.runtime.bundle import (
    FORMS,
    MANIFEST,
    PRECISIONS,
    SCHEMA,
    Bundle,
    OutputRef,
    file_entry,
    sha256_file,
)
from edgegen.runtime.check import REFERENCE, check_bundle, failures, pooled_cosine, psnr_db, save_reference
from edgegen.runtime.errors import BadInputError, ValidationFailedError
from edgegen.runtime.tokenize import PromptTokenizer

from . import int8
from .families import ComponentDef, Family, load_family
from .lora import TargetIndex
from .onnx_export import EXTERNAL_SUFFIX, OPSET, export_component
from .progress import Steps
from .weights import share_weights

DEFAULT_MAX_BATCH = 16


def parse_precisions(text: str | list[str]) -> list[str]:
    items = [p.strip() for p in (text.split(",") if isinstance(text, str) else text) if p.strip()]
    bad = [p for p in items if p not in PRECISIONS]
    if not items or bad:
        raise BadInputError(
            "--precision",
            f"unknown precision(s): {bad or text!r}",
            f"give a comma-separated list of {', '.join(PRECISIONS)}",
        )
    if "fp32" not in items:
        items.insert(0, "fp32")  # the reference every other precision is measured against
    return sorted(set(items), key=PRECISIONS.index)


def export_checkpoint(
    checkpoint: str | os.PathLike,
    output: str | os.PathLike,
    precisions="fp32",
    max_batch: int = DEFAULT_MAX_BATCH,
    overwrite: bool = False,
    progress: bool = True,
    allow_degraded: bool = False,
    gates: dict | None = None,
    engines: str | None = None,
    compute_capability: str | None = None,
    workspace_mb: int = 2048,
    refittable: bool = False,
    family_options: dict | None = None,
) -> Path:
    """Export ``checkpoint`` to the bundle directory ``output``; returns its path.

    ``family_options`` go to the checkpoint's family (diffusion: ``image_size``, ``fused_steps``,
    ``num_steps``, ``guidance_scale``).

    Every precision besides fp32 must pass its quality gate (``GATES``, or ``gates`` to override) against
    PyTorch fp32, or the export fails; ``allow_degraded`` keeps such a bundle and marks it degraded.

    Writes into a temporary directory beside ``output`` and renames it into place only when every
    check passed: an interrupted or failed export leaves nothing at ``output``.
    """
    precisions = parse_precisions(precisions)
    out, checkpoint = Path(output), Path(checkpoint)
    _check_request(out, overwrite, max_batch, engines, compute_capability, workspace_mb)
    if refittable and not engines:
        raise BadInputError("--refittable", "applies to engines", "pass --engines trt or trt-rtx with it")
    forms = [f for p in precisions[1:] for f in FORMS[p]]
    gates = {f: dict(g) for f, g in {**GATES, **(gates or {})}.items() if f in ["fp32", *forms]}
    steps = Steps(
        [
            "load checkpoint",
            "PyTorch reference",
            "trace to ONNX",
            "convert precisions",
            "validate parity",
            "write bundle",
            *(["build engines"] if engines else []),
        ],
        progress,
    )
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    tmp.chmod(0o755)
    try:
        with steps.step("load checkpoint"):
            work = _load(checkpoint, family_options or {}, precisions, tmp)
        with steps.step("PyTorch reference"):
            _reference(work)
        with steps.step("trace to ONNX", total=len(work.components)) as bar, work.family.tracing():
            _trace(work, bar.update)
        with steps.step("convert precisions", total=len(forms)) as bar:
            quantization = _convert(work, forms, gates, bar.update)
        lora = _store_weights(work, precisions)
        manifest = _manifest(work, precisions, gates, max_batch, checkpoint)
        if lora:
            manifest["lora"] = lora
        with steps.step("validate parity"):
            report = _validate(work, manifest, precisions, quantization)
        _accept(report, manifest, checkpoint, allow_degraded)
        with steps.step("write bundle"):
            _write(tmp, manifest, report)
        if engines:  # what `edgegen engines` does to a finished bundle, here before it is moved into place
            with steps.step("build engines"):
                from edgegen.runtime.engine_build import add_engines

                add_engines(tmp, engines, compute_capability, workspace_mb, progress, refittable)
        _move_into_place(tmp, out)
        return out
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@dataclass
class _Work:
    """What the steps of one export share: the bundle directory being written and what is known so far."""

    tmp: Path
    family: Family
    tokenize: PromptTokenizer
    components: list[ComponentDef]
    cases: list[dict] = field(default_factory=list)  # {"in", "out", "meta"} per reference case
    files: dict[str, dict[str, str]] = field(default_factory=dict)  # component -> {form: path in the bundle}


def _check_request(out: Path, overwrite: bool, max_batch, engines, compute_capability, workspace_mb) -> None:
    """Refuse bad options now, not after the long steps."""
    if out.exists() and not overwrite:
        raise BadInputError(
            f"output {out}", "already exists", "choose another path or pass --force to replace it"
        )
    if not isinstance(max_batch, int) or max_batch < 1:
        raise BadInputError("max_batch", f"expected a positive integer, got {max_batch!r}", "use e.g. 16")
    out.parent.mkdir(parents=True, exist_ok=True)
    if engines is not None and engines not in ENGINE_FLAVOURS:
        raise BadInputError("--engines", f"unknown engine flavour {engines!r}", f"use {flavour_choices()}")
    if engines:
        from edgegen.runtime.engine_build import check_options, target_capability
        from edgegen.runtime.engines import import_flavour

        check_options(engines, compute_capability, workspace_mb)
        import_flavour(engines)
        target_capability(engines, compute_capability)


def _load(checkpoint: Path, family_options: dict, precisions: list[str], tmp: Path) -> _Work:
    """Load the family, write the files it ships as they are (tokenizer, extras); the runtime's tokenizer."""
    family = load_family(checkpoint, **family_options)
    family.check_precisions(precisions)
    (tmp / "onnx").mkdir()
    settings = family.tokenizer_settings()
    (tmp / settings["file"]).write_text(family.tokenizer_json(), encoding="utf-8")
    for rel, source in family.extra_files().items():
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, tmp / rel)
    tokenize = PromptTokenizer.from_settings(tmp / settings["file"], settings)
    return _Work(tmp, family, tokenize, family.components())


def _reference(work: _Work) -> None:
    """PyTorch's outputs of every component on the family's reference cases, saved as reference.npz."""
    work.cases = [
        {"in": inputs, "out": _torch_outputs(work.components, inputs), "meta": meta}
        for inputs, meta in work.family.reference_cases(work.tokenize)
    ]
    save_reference(work.tmp / REFERENCE, work.cases)


def _trace(work: _Work, advance) -> None:
    """Each component's fp32 ONNX file: traced on the longest case, or assembled from those traced before."""
    sample = max((c["in"] for c in work.cases), key=lambda c: len(c["input_ids"]))
    for comp in work.components:
        rel = f"onnx/{comp.name}.fp32.onnx"
        if comp.assemble is not None:
            comp.assemble({name: work.tmp / f["fp32"] for name, f in work.files.items()}, work.tmp / rel)
        else:
            export_component(comp, sample, work.tmp / rel)
        work.files[comp.name] = {"fp32": rel}
        advance(1)


def _convert(work: _Work, forms: list[str], gates: dict, advance) -> dict:
    """Every component in every further form; returns the int8 forms' quantization reports."""
    quantization = {}
    for form in forms:
        if form == "fp16":
            _write_form(work, form, _fp16)
        else:
            quantization[form] = _quantize(work, form, gates[form])
        advance(1)
    return quantization


def _quantize(work: _Work, form: str, gate: dict) -> dict:
    """The int8 ``form`` of every component, with the layer groups kept back that the gate needs: scanned on
    the graph of the family's reference pixels (a whole call), applied to every component alike."""
    calibration = [inputs for inputs, _ in work.family.calibration_cases(work.tokenize)]
    refs = work.family.reference_outputs()
    wrappers = tuple(c.name for c in work.components)
    scanned = work.tmp / work.files[refs["pixels"].component]["fp32"]
    kept, alone = int8.keep_back(
        scanned, form, calibration, lambda path: score_graph(path, work.cases, refs), gate, wrappers
    )
    _write_form(
        work, form, lambda src, dst: int8.quantize(src, dst, form, calibration, kept, wrappers=wrappers)
    )
    return {
        "calibration_prompts": sum(len(c["input_ids"]) for c in calibration),
        "kept_back": {
            b: "activations kept in float, weights int8: when it alone was quantized "
            + ", ".join(f"{m} {v:g}" for m, v in alone[b].items())
            + "; kept back, worst first, until the gate passed"
            for b in sorted(kept)
        },
        "when_quantized_alone": alone,
    }


def _write_form(work: _Work, form: str, convert) -> None:
    """Write every component in ``form``; components not quantized (the judge) share the fp32 file."""
    for comp in work.components:
        rel = work.files[comp.name]["fp32"]
        if comp.quantize:
            rel = f"onnx/{comp.name}.{form}.onnx"
            convert(work.tmp / work.files[comp.name]["fp32"], work.tmp / rel)
        work.files[comp.name][form] = rel


def _store_weights(work: _Work, precisions: list[str]) -> dict | None:
    """One weights file per precision, each distinct tensor stored once. For a family that takes LoRAs,
    returns the manifest's ``lora`` entry: the LoRAs fused, and where each weight a LoRA may target lies
    in each precision's file."""
    parts = work.family.lora_parts()
    traced = [c.module for c in work.components]
    index = TargetIndex(parts, traced, fp16="fp16" in precisions) if parts else None
    always = index.target_keys if index else frozenset()  # stored in the shared file however small
    offsets = {}
    for precision in precisions:
        rels = sorted({work.files[c.name][f] for c in work.components for f in FORMS[precision]})
        offsets[precision] = share_weights(work.tmp, rels, f"onnx/weights.{precision}.bin", always)
    for stale in (work.tmp / "onnx").glob(f"*{EXTERNAL_SUFFIX}"):  # a >2 GB graph's own weights, now shared
        stale.unlink()
    return {"fused": work.family.loras_fused, "targets": index.targets(offsets)} if index else None


def _validate(work: _Work, manifest: dict, precisions: list[str], quantization: dict) -> dict:
    """The report: the runtime's own check of the bundle (parity, gates) and the tokenizer's agreement."""
    manifest["files"] = {rel: file_entry(work.tmp, rel) for rel in _listed(work.tmp)}
    report = check_bundle(Bundle(work.tmp, manifest), "ort-cpu", precisions)
    report["tokenizer"] = _tokenizer_agreement(work.family, work.tokenize)
    report["quantization"] = quantization
    report["ok"] = report["ok"] and report["tokenizer"]["ok"]
    report["created"] = manifest["provenance"]["export_date"]
    return report


def _accept(report: dict, manifest: dict, checkpoint: Path, allow_degraded: bool) -> None:
    """A parity failure is a bug and always fails; a missed quality gate fails unless ``allow_degraded``,
    which keeps the bundle marked degraded."""
    parity_ok = report["tokenizer"]["ok"] and all(
        p["ok"] for e in report["precisions"].values() for p in e["parity"].values()
    )
    if not parity_ok:
        lines = failures(report) or [f"tokenizer: {report['tokenizer']}"]
        raise ValidationFailedError(
            f"export {checkpoint}",
            "ONNX disagrees with PyTorch: " + "; ".join(lines),
            "this is a bug in the export of this model; report it with the checkpoint's config",
        )
    if not report["ok"]:
        lines = failures(report)
        if not allow_degraded:
            raise ValidationFailedError(
                f"export {checkpoint}",
                "failed: " + "; ".join(lines),
                "drop that precision, or pass --allow-degraded to keep a bundle marked degraded",
            )
        report["degraded"] = manifest["degraded"] = lines


def _write(tmp: Path, manifest: dict, report: dict) -> None:
    (tmp / "report.json").write_text(json.dumps(report, indent=2))
    manifest["files"] = {rel: file_entry(tmp, rel) for rel in _listed(tmp)}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))


# Quality gates against PyTorch fp32, on the family's validation prompts and seeds (minimums).
GATES = {
    "fp16": {"psnr_db": 35.0, "text_cosine": 0.999},
    "int8": {"psnr_db": 25.0, "text_cosine": 0.98},
    # static activation ranges throughout: on emoji64, pixels at 28.0 dB (text cosine 0.980-0.993) lost 0.19
    # of the judge's adherence; the CPU form's 42.7 dB (0.989) lost 0.003. The scan keeps groups back until
    # both clear a margin over the CPU form's minimums
    "int8-qdq": {"psnr_db": 35.0, "text_cosine": 0.985},
}


# With a judge: the most adherence (seen or held-out, fraction) a precision may lose against fp32.
ADHERENCE_GATES = {"fp16": -0.005, "int8": -0.02}


def _fp16(src: Path, dst: Path) -> None:
    import onnx

    from .fp16 import convert_to_fp16

    onnx.save(convert_to_fp16(onnx.load(str(src))), str(dst))


def score_graph(path: Path, cases: list[dict], refs: dict[str, OutputRef]) -> dict:
    """Gate metrics of a candidate graph of the reference pixels' component on the reference cases: pixel PSNR
    and, where the same graph gives the scored text states, their pooled cosine."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    pixels, text = refs["pixels"], refs.get("text_states")
    scores_text = text is not None and text.component == pixels.component
    names = [pixels.output] + ([text.output] if scores_text else [])
    got, want, cosines = [], [], []
    for case in cases:
        outs = session.run(names, {i.name: case["in"][i.name] for i in session.get_inputs()})
        got.append(outs[0].ravel())
        want.append(case["out"][pixels.component][pixels.output].ravel())
        if scores_text:
            expected = case["out"][text.component][text.output]
            cosines.append(pooled_cosine(outs[1], expected, case["in"]["attention_mask"]))
    scores = {"psnr_db": psnr_db(np.concatenate(got), np.concatenate(want))}
    if cosines:
        scores["text_cosine"] = float(np.min(np.concatenate(cosines)))
    return scores


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
    theirs = family.hf_tokenizer(
        prompts, padding="max_length", truncation=True, max_length=tokenize.max_length, return_tensors="np"
    )
    same = bool(
        np.array_equal(ours.input_ids, theirs["input_ids"])
        and np.array_equal(ours.attention_mask, theirs["attention_mask"])
    )
    return {"ok": same, "prompts": len(prompts), "truncation_reported": bool(ours.truncated[-1])}


def _manifest(work: _Work, precisions: list[str], gates: dict, max_batch: int, checkpoint: Path) -> dict:
    import onnx
    import onnxruntime
    import transformers

    family, files = work.family, work.files
    if "quality" in family.manifest_extras():  # a judge ships with the model: prompt adherence is gated too
        for form, gate in gates.items():
            gate.setdefault("adherence_vs_fp32", ADHERENCE_GATES[form.split("-")[0]])
    return {
        "schema": SCHEMA,
        "family": family.name,
        "components": {
            c.name: {
                "inputs": [t.to_json() for t in c.inputs],
                "outputs": [t.to_json() for t in c.outputs],
                "files": files[c.name],
                "tolerance": {"fp32": c.tolerance},
            }
            for c in work.components
        },
        "reference_outputs": {role: ref.to_json() for role, ref in family.reference_outputs().items()},
        "tokenizer": family.tokenizer_settings(),
        "generation": family.generation(max_batch),
        "model": family.describe(),
        "engines": [],
        **family.manifest_extras(),
        "precisions": precisions,
        "gates": gates,
        "provenance": {
            "checkpoint": checkpoint.name,
            "checkpoint_sha256": checkpoint_hash(checkpoint),
            "edgegen": __version__,
            "torch": torch.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__,
            "transformers": transformers.__version__,
            "opset": OPSET,
            "python": platform.python_version(),
            "machine": platform.machine(),
            "export_date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        },
    }


def checkpoint_hash(root: Path) -> str:
    """sha256 over every file of the checkpoint (relative path + content), in a stable order. Symbolic links
    are followed: the default model's checkpoint is a directory of links."""
    digest = hashlib.sha256()
    for rel in _checkpoint_files(root):
        digest.update(rel.encode() + b"\0")
        digest.update(sha256_file(root / rel).encode())
    return digest.hexdigest()


def _checkpoint_files(folder: Path, rel: str = "", ancestors: frozenset[Path] = frozenset()) -> list[str]:
    """Every file under ``folder``, relative to it, through links; a link into its own ancestors (a loop) is
    not followed."""
    real = folder.resolve()
    if real in ancestors:
        return []
    found = []
    for entry in sorted(folder.iterdir()):
        if entry.is_dir():
            found += _checkpoint_files(entry, f"{rel}{entry.name}/", ancestors | {real})
        elif entry.is_file():
            found.append(f"{rel}{entry.name}")
    return found


def _listed(root: Path) -> list[str]:
    return sorted(
        p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and p.name != MANIFEST
    )


def _move_into_place(tmp: Path, out: Path) -> None:
    if out.exists():  # --force: swap, so a crash never leaves neither bundle
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)
