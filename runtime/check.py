"""On-device validation: run a bundle's graphs on stored PyTorch reference inputs and compare.

Export writes ``reference.npz`` (inputs of several batch sizes and prompt lengths, and what PyTorch
computed from them). The same code checks parity at export time and, later, on any device and
backend, without torch: ONNX Runtime backends run the ONNX files, trt / trt-rtx run the bundle's
engines for this machine (the precisions that have engines).
"""

from __future__ import annotations

import math

import numpy as np

from .backends import backend_spec, engine_forms, make_session, open_graph
from .bundle import FORMS, PRECISIONS, Bundle, OutputRef
from .errors import BackendUnavailableError, BadBundleError
from .precision import form_for

REFERENCE = "reference.npz"
PSNR_CAP_DB = 100.0  # identical images: reported as this instead of infinity (JSON has no inf)


def load_reference(bundle: Bundle) -> list[dict]:
    """[{"in": {name: array}, "out": {component: {output: array}}, "meta": {prompts, seeds}}, ...]."""
    if REFERENCE not in bundle.manifest["files"]:
        raise BadBundleError(f"bundle {bundle.root}", f"has no {REFERENCE}", "re-export it with this edgegen")
    cases: dict[int, dict] = {}
    with np.load(bundle.path(REFERENCE), allow_pickle=False) as data:
        for key in data.files:
            case, kind, *rest = key.split(".")
            entry = cases.setdefault(int(case.removeprefix("case")), {"in": {}, "out": {}, "meta": {}})
            if kind in ("in", "meta"):
                entry[kind][rest[0]] = data[key]
            else:
                entry["out"].setdefault(rest[0], {})[rest[1]] = data[key]
    return [cases[i] for i in sorted(cases)]


def save_reference(path, cases: list[dict]) -> None:
    arrays = {}
    for i, case in enumerate(cases):
        arrays.update({f"case{i}.in.{k}": v for k, v in case["in"].items()})
        arrays.update({f"case{i}.meta.{k}": np.asarray(v) for k, v in case.get("meta", {}).items()})
        for comp, outs in case["out"].items():
            arrays.update({f"case{i}.out.{comp}.{k}": v for k, v in outs.items()})
    np.savez_compressed(path, **arrays)


def psnr_db(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return PSNR_CAP_DB if mse == 0 else min(PSNR_CAP_DB, 10 * math.log10(255.0**2 / mse))


def check_bundle(
    bundle: Bundle, backend: str = "ort-cpu", precisions: list[str] | None = None, adherence: bool = True
) -> dict:
    """Parity of every component against PyTorch's outputs and the quality gates, per precision form
    (int8 is checked in both its forms); ``ok`` only if all pass. A bundle with a judge (the default
    model) is also scored for prompt adherence (``adherence=False`` skips that, it takes a while); when fp32
    is not among the precisions checked, the adherence gate compares with report.json's fp32 figure."""
    from .quality import evaluate, has_judge

    scored = adherence and has_judge(bundle)
    cases = load_reference(bundle)
    report = {
        "backend": backend,
        "cases": [{k: list(v.shape) for k, v in c["in"].items()} for c in cases],
        "precisions": {},
    }
    forms = forms_to_check(bundle, backend, precisions)
    # the adherence gate's fp32 figure: this run's, or where fp32 is not checked (--precision int8) the
    # export's
    fp32_from = "this run" if "fp32" in forms else "report.json (export)"
    fp32_adherence = (
        None
        if "fp32" in forms or not scored
        else bundle.report().get("precisions", {}).get("fp32", {}).get("quality", {}).get("adherence")
    )
    text_source = bundle.reference_output("text_states")  # the text states the gate scores, named at export
    for precision in forms:
        parity, pixels, cosines = {}, [], []
        for name, comp in bundle.components.items():
            run = component_runner(bundle, name, precision, backend)
            # fp32 is held to PyTorch within the family's tolerances; fp16/int8 are judged by the quality
            # gate.
            tolerance = bundle.manifest["components"][name]["tolerance"].get(precision, {})
            errs = {o.name: [] for o in comp.outputs}
            for case in cases:
                got = run({t.name: case["in"][t.name] for t in comp.inputs})
                for spec, value in zip(comp.outputs, got):
                    errs[spec.name].append(np.abs(value.astype(np.float64) - case["out"][name][spec.name]))
                    if spec.dtype == "uint8":  # final pixels: also scored as an image
                        pixels.append((value.ravel(), case["out"][name][spec.name].ravel()))
                    if text_source == OutputRef(name, spec.name):
                        cosines.append(
                            pooled_cosine(value, case["out"][name][spec.name], case["in"]["attention_mask"])
                        )
            outputs = {}
            for out, diffs in errs.items():
                flat = np.concatenate([d.ravel() for d in diffs])
                max_abs = float(flat.max()) if flat.size else 0.0
                limit = tolerance.get(out)
                outputs[out] = {
                    "max_abs": max_abs,
                    "mean_abs": float(flat.mean()) if flat.size else 0.0,
                    "tolerance": limit,
                    "ok": limit is None or bool(max_abs <= limit),
                }
            first = outputs[comp.outputs[0].name]
            parity[name] = {
                "max_abs": first["max_abs"],
                "tolerance": first["tolerance"],
                "ok": all(o["ok"] for o in outputs.values()),
                "outputs": outputs,
            }
        report["precisions"][precision] = {"parity": parity, "ok": all(p["ok"] for p in parity.values())}
        entry = report["precisions"][precision]
        quality = entry["quality"] = {}
        if pixels:
            got, want = (np.concatenate(x) for x in zip(*pixels))
            quality["psnr_db"] = psnr_db(got, want)
        if cosines:
            quality["text_cosine"] = float(np.min(np.concatenate(cosines)))
        if scored:
            from .pipeline import Pipeline

            pipe = Pipeline.for_family(bundle)(bundle, backend, precision.split("-")[0], [], form=precision)
            quality.update(evaluate(pipe))
            if precision == "fp32":
                fp32_adherence = quality["adherence"]
            elif fp32_adherence:
                quality["adherence_vs_fp32"] = min(
                    quality["adherence"][k] - fp32_adherence[k] for k in ("seen", "heldout")
                )
                quality["adherence_fp32_from"] = fp32_from
        gate = bundle.manifest.get("gates", {}).get(precision)
        if gate:
            entry["gate"] = gate_result(gate, quality)
            entry["ok"] = entry["ok"] and entry["gate"]["ok"]
    report["ok"] = all(p["ok"] for p in report["precisions"].values())
    return report


def forms_to_check(bundle: Bundle, backend: str, precisions: list[str] | None) -> list[str]:
    """The file forms to validate: on ONNX Runtime every form of each precision (int8 in both its forms); on
    trt / trt-rtx the form each precision runs as, for the precisions that have engines for this machine
    (all of them when ``precisions`` is None; a precision asked for by name must have its engines)."""
    wanted = precisions or bundle.precisions
    if not backend_spec(backend).engines:
        return [f for p in wanted for f in FORMS[p]]
    from .engines import rebuild_hint

    have = engine_forms(bundle, backend)  # version, GPU and source checks; raises when none fit this machine
    missing = [p for p in wanted if form_for(p, backend) not in have]
    if (precisions and missing) or len(missing) == len(wanted):
        built = [p for p in PRECISIONS if form_for(p, backend) in have]
        raise BackendUnavailableError(
            f"bundle engines ({backend})",
            f"no {', '.join(missing)} engines for this machine",
            f"engines exist for {', '.join(built) or 'no precision'}: validate "
            f"{'with --precision ' + built[0] if built else 'another precision'}, build them "
            f"({rebuild_hint(bundle, backend)}), or check the ONNX files with --backend ort-cuda",
        )
    return [form_for(p, backend) for p in wanted if p not in missing]


def component_runner(bundle: Bundle, name: str, form: str, backend: str):
    """A function {input: array} -> [outputs in the manifest's order] for component ``name`` in ``form``:
    an ONNX Runtime session, or on trt / trt-rtx the component's engine through ``open_graph``, as the
    pipelines run it (the judge has no engine: it runs on ONNX Runtime, as the pipelines score with it)."""
    if name == "judge":
        from .quality import judge_backend

        backend = judge_backend(backend)
    if not backend_spec(backend).engines:
        session = make_session(bundle.onnx_path(name, form), backend)
        return lambda feeds: session.run(None, feeds)
    graph = open_graph(bundle, name, form, backend)
    outputs = [t.name for t in bundle.components[name].outputs]

    def run(feeds: dict) -> list:
        batch = len(next(iter(feeds.values())))
        inputs = graph.inputs(batch)
        for key, value in feeds.items():
            inputs[key][...] = value
        got = graph.run(batch)
        return [got[out].copy() for out in outputs]

    return run


def pooled_cosine(got, want, mask) -> np.ndarray:
    """Per prompt: cosine between mask-averaged text states (what the generator's pooled conditioning
    sees)."""
    w = mask[..., None].astype(np.float64)
    a, b = ((x.astype(np.float64) * w).sum(1) / w.sum(1) for x in (got, want))
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)


def gate_result(gate: dict, quality: dict) -> dict:
    """Each gate threshold is a minimum: {metric: {"value", "min", "ok"}}, plus ``ok`` overall."""
    checks = {}
    for metric, minimum in gate.items():
        value = quality.get(metric)
        checks[metric] = {"value": value, "min": minimum, "ok": value is not None and value >= minimum}
    return {"checks": checks, "ok": all(c["ok"] for c in checks.values())}


def failures(report: dict) -> list[str]:
    """One line per failing output or gate: what, the value, and the limit."""
    lines = []
    for precision, entry in report["precisions"].items():
        for metric, c in entry.get("gate", {}).get("checks", {}).items():
            if not c["ok"]:
                lines.append(f"{precision} quality gate {metric}: {c['value']} < {c['min']}")
        for comp, p in entry["parity"].items():
            for out, o in p["outputs"].items():
                if not o["ok"]:
                    lines.append(
                        f"{precision} {comp}.{out}: max abs error {o['max_abs']:.3g} "
                        f"> tolerance {o['tolerance']:.3g}"
                    )
    return lines


def pipeline_parity(pipe) -> float:
    """Largest pixel difference between the whole runtime path (tokenizer, noise, graphs) and PyTorch."""
    ref = pipe.bundle.reference_output("pixels")
    if ref is None:
        raise BadBundleError(
            f"bundle {pipe.bundle.root}",
            "names no reference pixels of a whole call",
            "its default call has no PyTorch reference: compare the components with `edgegen validate`",
        )
    worst = 0.0
    for case in load_reference(pipe.bundle):
        prompts = [str(p) for p in case["meta"]["prompts"]]
        seeds = [int(s) for s in case["meta"]["seeds"]]
        got = pipe(prompts, seed=seeds, output_type="uint8")
        want = case["out"][ref.component][ref.output]
        worst = max(worst, float(np.abs(got.astype(np.int16) - want.astype(np.int16)).max()))
    return worst
