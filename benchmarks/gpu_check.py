"""The GPU check (issue 24): every GPU path of edgegen in one short run, under a hard time budget.

    python -m benchmarks.gpu_check [--budget 480] [--out gpu-check] [--emulate]

Steps, each a subprocess with its own timeout (a failing step is recorded and the next one runs):
  1. environment: GPU, driver, CUDA, ONNX Runtime / TensorRT flavours, `edgegen doctor --json`;
  2. `pytest -m gpu` with a per-test timeout;
  3. the default model on ort-cuda: fp32 / fp16 / int8, batch 1 and 16, CUDA graphs on and off
     (`edgegen bench --json`), pixel parity against ort-cpu fp32;
  4. the SD-Turbo architecture (random weights), 512x512, 1 step, fp16: edgegen ort-cuda against diffusers
     fp16 eager, per stage, batch 1 and 4;
  5. the runtime's overhead per call (end to end minus engine time) for both models.
results.json and results.md in --out are rewritten after every step, so a run cut off still reports.

``--emulate`` runs the same steps on this CPU with the CUDA host emulation the tests use
(tests/gpu_emulation.py: "device" memory in host memory, ort-cuda sessions on the CPU provider) and tiny
models, so the script itself is tested (tests/test_gpu_check.py) before any GPU time is spent.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EMULATE_ENV = "EDGEGEN_GPU_CHECK_EMULATE"  # set in the children of an --emulate run
PROMPTS = ["a red apple", "a cat on a blue background", "the moon", "a rocket over the sea"]
MARGIN_S = 5  # kept back from the budget to write the last results


# ---------------------------------------------------------------- what each run measures


class Plan:
    """Sizes of a run: the real one on a GPU, or the tiny emulated one on this CPU."""

    def __init__(self, emulate: bool, work: Path):
        self.emulate, self.work = emulate, work
        self.precisions = ["fp32"] if emulate else ["fp32", "fp16", "int8"]
        self.batches = [2] if emulate else [1, 16]
        self.iterations, self.warmup = (3, 1) if emulate else (50, 5)
        self.diffusion_batches = [1, 2] if emulate else [1, 4]
        self.diffusion_size = 32 if emulate else 512
        self.diffusion_precision = "fp32" if emulate else "fp16"
        self.diffusion_rounds = 1 if emulate else 10


# ---------------------------------------------------------------- the report, written as it goes


class Report:
    def __init__(self, out: Path, budget_s: float, emulate: bool, command: str):
        self.out, self.start = out, time.monotonic()
        self.deadline = self.start + budget_s
        self.data = {
            "command": command,
            "emulated": emulate,
            "budget_s": budget_s,
            "host": platform.node(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "finished": False,
            "steps": [],
        }
        out.mkdir(parents=True, exist_ok=True)
        self.write()

    def left(self) -> float:
        return self.deadline - time.monotonic() - MARGIN_S

    def add(self, entry: dict) -> dict:
        self.data["steps"].append(entry)
        self.data["elapsed_s"] = round(time.monotonic() - self.start, 1)
        self.write()
        return entry

    def write(self) -> None:
        for name, text in (
            ("results.json", json.dumps(self.data, indent=2)),
            ("results.md", markdown(self.data)),
        ):
            tmp = self.out / f".{name}.tmp"
            tmp.write_text(text)
            tmp.replace(self.out / name)  # a reader never sees half a file


def run(
    report: Report, step: str, name: str, argv: list[str], timeout_s: float, parse_json: bool = True
) -> dict:
    """One subprocess (its own process group, killed whole at its timeout or the budget's end); recorded."""
    timeout = min(timeout_s, report.left())
    entry = {"step": step, "name": name, "command": " ".join(argv), "ok": False}
    if timeout < 1:
        entry.update(status="skipped", error="the time budget is spent")
        return report.add(entry)
    started = time.monotonic()
    try:
        proc = subprocess.Popen(
            argv,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
            env=os.environ.copy(),
        )
    except OSError as e:  # no such program (nvidia-smi on a CPU)
        entry.update(status="not started", error=str(e), seconds=0.0)
        return report.add(entry)
    try:
        out, err = proc.communicate(timeout=timeout)
        status = "ok" if proc.returncode == 0 else f"exit {proc.returncode}"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # pytest and ONNX Runtime threads go with it
        out, err = proc.communicate()
        status = f"timed out after {timeout:.0f} s"
    entry.update(
        status=status,
        ok=status == "ok",
        seconds=round(time.monotonic() - started, 1),
        stderr_tail=err[-1500:],
        stdout_tail=out[-1500:],
    )
    if parse_json:
        entry["result"] = last_json(out)
    return report.add(entry)


def last_json(text: str):
    """The JSON object a command printed (the whole output, else its last line that parses), or None."""
    for candidate in (text, *reversed(text.strip().splitlines())):
        try:
            return json.loads(candidate)
        except ValueError:
            continue
    return None


def bench_run(result) -> dict | None:
    """The one timed run of an `edgegen bench --json` result ({"ok", "runs": [...]}), or None."""
    runs = result.get("runs") if isinstance(result, dict) else None
    return runs[0] if isinstance(runs, list) and runs else None


def child(kind: str, *args) -> list[str]:
    """The command of a child of this script (emulated too, when the parent is)."""
    return [sys.executable, "-m", "benchmarks.gpu_check", "--child", kind, *map(str, args)]


# ---------------------------------------------------------------- the steps


def step_environment(report: Report, plan: Plan, bundle: str | None) -> None:
    run(
        report,
        "1",
        "nvidia-smi",
        ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,compute_cap", "--format=csv,noheader"],
        30,
        parse_json=False,
    )
    run(report, "1", "versions", child("versions"), 60)
    run(
        report,
        "1",
        "edgegen doctor",
        child("edgegen", "doctor", "--json", *(["--bundle", bundle] if bundle else [])),
        240,
    )


def step_pytest(report: Report, plan: Plan) -> None:
    argv = [
        sys.executable,
        "-m",
        "pytest",
        "-m",
        "gpu",
        "-q",
        "-rs",
        "-p",
        "no:cacheprovider",
        "tests/test_gpu_backends.py",
    ]
    if plan.emulate:
        argv.append("--collect-only")  # the GPU tests skip on a CPU; collecting them checks they import
    else:
        argv.append("--timeout=150")  # pytest-timeout (installed on the GPU machine)
    run(report, "2", "pytest -m gpu", argv, 300, parse_json=False)


def step_default_model(report: Report, plan: Plan, bundle: str) -> None:
    for precision in plan.precisions:
        for batch in plan.batches:
            for graphs in (True, False):
                argv = child(
                    "edgegen",
                    "bench",
                    bundle,
                    "--backend",
                    "ort-cuda",
                    "--precision",
                    precision,
                    "--batch",
                    batch,
                    "--iterations",
                    plan.iterations,
                    "--warmup",
                    plan.warmup,
                    "--json",
                    *([] if graphs else ["--no-cuda-graphs"]),
                )
                entry = run(
                    report,
                    "3",
                    f"bench ort-cuda {precision} batch {batch} graphs {'on' if graphs else 'off'}",
                    argv,
                    120,
                )
                entry["bench"] = summary(bench_run(entry.get("result")))
                report.write()
    run(report, "3", "parity vs ort-cpu fp32", child("parity", bundle, ",".join(plan.precisions)), 120)


def step_diffusion(report: Report, plan: Plan, checkpoint: str | None, bundle: str | None) -> str | None:
    work = plan.work / "diffusion"
    entry = run(
        report,
        "4",
        "SD-Turbo architecture: edgegen ort-cuda vs diffusers eager",
        child(
            "diffusion",
            checkpoint or work / "ckpt",
            bundle or work / "bundle",
            plan.diffusion_size,
            plan.diffusion_precision,
            ",".join(map(str, plan.diffusion_batches)),
            plan.diffusion_rounds,
        ),
        420,
    )
    result = entry.get("result") or {}
    return result.get("bundle")


def step_overhead(report: Report, plan: Plan, bundle: str, diffusion_bundle: str | None) -> None:
    default = [s["bench"] for s in report.data["steps"] if s.get("bench") and s["bench"].get("cuda_graphs")]
    rows = {f"default model {b['precision']} batch {b['batch']}": b["overhead_ms_p50"] for b in default}
    if diffusion_bundle:
        entry = run(
            report,
            "5",
            "diffusion bench ort-cuda",
            child(
                "edgegen",
                "bench",
                diffusion_bundle,
                "--backend",
                "ort-cuda",
                "--precision",
                plan.diffusion_precision,
                "--iterations",
                plan.iterations,
                "--warmup",
                plan.warmup,
                "--json",
            ),
            180,
        )
        b = entry["bench"] = summary(bench_run(entry.get("result")))
        if b:
            rows[f"SD-Turbo architecture {b['precision']} batch {b['batch']}"] = b["overhead_ms_p50"]
    report.data["overhead_ms_p50_with_cuda_graphs"] = rows
    report.write()


def summary(r: dict | None) -> dict | None:
    if not r:
        return None
    return {
        "backend": r.get("backend"),
        "precision": r.get("precision"),
        "batch": r.get("batch"),
        "cuda_graphs": r.get("cuda_graphs"),
        "end_to_end_ms_p50": r["end_to_end_ms"]["p50"],
        "engine_ms_p50": r.get("engine_ms", {}).get("p50"),
        "overhead_ms_p50": r.get("overhead_ms", {}).get("p50"),
        "images_per_s": r.get("images_per_s"),
    }


def check(args) -> int:
    out = Path(args.out)
    plan = Plan(args.emulate, out / "work")
    report = Report(out, args.budget, args.emulate, "python -m benchmarks.gpu_check " + " ".join(args.argv))
    if args.emulate:
        os.environ[EMULATE_ENV] = "1"
    bundle = args.bundle
    if bundle is None:
        prepared = run(report, "0", "default model bundle", child("bundle", plan.work / "gan"), 300)
        bundle = (prepared.get("result") or {}).get("bundle")
    step_environment(report, plan, bundle)
    step_pytest(report, plan)
    if bundle:
        step_default_model(report, plan, bundle)
    diffusion_bundle = step_diffusion(report, plan, args.diffusion_checkpoint, args.diffusion_bundle)
    if bundle:
        step_overhead(report, plan, bundle, diffusion_bundle)
    report.data["finished"] = True
    report.data["elapsed_s"] = round(time.monotonic() - report.start, 1)
    report.write()
    print((out / "results.md").read_text())
    expected_to_fail = {"nvidia-smi"} if args.emulate else set()  # no GPU tools on the CPU
    return 0 if all(s["ok"] for s in report.data["steps"] if s["name"] not in expected_to_fail) else 1


# ---------------------------------------------------------------- Markdown


def markdown(data: dict) -> str:
    lines = [
        f"# GPU check{' (emulated on the CPU)' if data['emulated'] else ''}",
        "",
        f"`{data['command']}`, started {data['started']} on {data['host']}, budget {data['budget_s']:.0f} s, "
        f"{'finished' if data['finished'] else 'NOT finished (cut off or still running)'}"
        f" after {data.get('elapsed_s', 0)} s.",
        "",
        "| step | what | status | s |",
        "| --- | --- | --- | --- |",
    ]
    lines += [
        f"| {s['step']} | {s['name']} | {s['status']} | {s.get('seconds', '')} |" for s in data["steps"]
    ]
    benches = [s["bench"] for s in data["steps"] if s.get("bench")]
    if benches:
        lines += [
            "",
            "| backend | precision | batch | CUDA graphs | end to end p50 ms | engine p50 ms "
            "| overhead p50 ms | images/s |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        lines += [
            f"| {b['backend']} | {b['precision']} | {b['batch']} | {b['cuda_graphs']} "
            f"| {b['end_to_end_ms_p50']:.3f} | {_ms(b['engine_ms_p50'])} | {_ms(b['overhead_ms_p50'])} "
            f"| {b['images_per_s']:.1f} |"
            for b in benches
        ]
    for s in data["steps"]:
        result = s.get("result")
        if s["name"].startswith(("parity", "SD-Turbo")) and isinstance(result, dict):
            lines += ["", f"**{s['name']}**: `{json.dumps(result)[:1500]}`"]
    if data.get("overhead_ms_p50_with_cuda_graphs"):
        lines += [
            "",
            "Runtime overhead per call (p50, CUDA graphs on): "
            + ", ".join(
                f"{k} {v * 1000:.0f} us"
                for k, v in data["overhead_ms_p50_with_cuda_graphs"].items()
                if v is not None
            ),
        ]
    failed = [s for s in data["steps"] if not s["ok"]]
    for s in failed:
        lines += [
            "",
            f"**{s['name']}** {s['status']}: `{s['command']}`",
            "```",
            (s.get("stderr_tail") or s.get("error") or "")[-800:],
            "```",
        ]
    return "\n".join(lines) + "\n"


def _ms(v) -> str:
    return "" if v is None else f"{v:.3f}"


# ---------------------------------------------------------------- children (run in subprocesses)


def activate_emulation() -> None:
    """The tests' CUDA host emulation (tests/gpu_emulation.py) in this process: ort-cuda runs its device
    graphs (pinned arrays, device buffers, copies, CUDA-graph sessions) with the CPU provider."""
    sys.path.insert(0, str(ROOT / "tests"))
    from edgegen.runtime import backends, cudart, doctor, ort_gpu
    from gpu_emulation import HostCuda

    cudart.set_runtime(HostCuda())
    ort_gpu.ORT_DEVICE = "cpu"
    real_session = backends.make_session

    def make_session(path, backend, options=None, provider_options=None):
        return real_session(path, "ort-cpu" if backend in ("ort-cuda", "ort-trt") else backend, options)

    def backend_loads(name):
        return (True, "") if name in ("ort-cpu", "ort-cuda") else (False, "not emulated")

    backends.make_session, backends.backend_loads, doctor.backend_loads = (
        make_session,
        backend_loads,
        backend_loads,
    )
    doctor.gpu_status = lambda: {
        "available": True,
        "error": None,
        "libcudart": "host emulation",
        "devices": [{"index": 0, "compute_capability": "8.9", "name": "host emulation"}],
    }


def child_versions() -> dict:
    import onnxruntime as ort
    from edgegen.runtime import doctor  # its gpu_status is the emulated one in an emulated run

    versions = {
        "python": platform.python_version(),
        "onnxruntime": ort.__version__,
        "device": ort.get_device(),
        "providers": ort.get_available_providers(),
        "tensorrt": doctor.tensorrt_flavours(),
        "gpu": doctor.gpu_status(),
    }
    for name in ("torch", "diffusers", "transformers", "numpy"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            versions[name] = None
    try:
        import torch

        versions["torch_cuda"] = torch.version.cuda
        versions["torch_gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        pass
    return versions


def child_bundle(work: str) -> dict:
    """The default model's bundle (a tiny bert model when emulated): exported once, then reused."""
    if not os.environ.get(EMULATE_ENV):
        from edgegen.export import default_bundle

        return {"bundle": str(default_bundle())}
    from edgegen.export import export_checkpoint
    from edgegen.export.testing import make_tiny_checkpoint

    bundle = Path(work) / "bundle"
    if not (bundle / "manifest.json").is_file():
        export_checkpoint(
            make_tiny_checkpoint(Path(work) / "ckpt"),
            bundle,
            progress=False,
            precisions="fp32",
            overwrite=True,
        )
    return {"bundle": str(bundle)}


def child_parity(bundle: str, precisions: str) -> dict:
    import numpy as np
    from edgegen.runtime import Pipeline

    seeds = list(range(len(PROMPTS)))
    reference = Pipeline.from_bundle(bundle, backend="ort-cpu", precision="fp32")
    want = reference(PROMPTS, seed=seeds, output_type="uint8").astype(int)
    out = {}
    for precision in precisions.split(","):
        try:
            pipe = Pipeline.from_bundle(bundle, backend="ort-cuda", precision=precision)
            got = pipe(PROMPTS, seed=seeds, output_type="uint8").astype(int)
            out[precision] = {
                "max_abs_pixel_diff": int(np.abs(got - want).max()),
                "mean_abs_pixel_diff": float(np.abs(got - want).mean()),
                "backend": pipe.backend,
            }
        except Exception as e:  # noqa: BLE001  (each precision is reported, the others still run)
            out[precision] = {"error": f"{type(e).__name__}: {e}"}
    return {"ok": all("error" not in v for v in out.values()), "against": "ort-cpu fp32", "precisions": out}


def child_diffusion(ckpt: str, bundle: str, size: str, precision: str, batches: str, rounds: str) -> dict:
    """edgegen ort-cuda (stage by stage) against diffusers eager in this process, per stage and batch; the
    checkpoint and bundle are made where missing (a rerun reuses them)."""
    import numpy as np

    ckpt, bundle, size, rounds = Path(ckpt), Path(bundle), int(size), int(rounds)
    emulated = bool(os.environ.get(EMULATE_ENV))
    timings = {}
    t = time.perf_counter()
    if not (ckpt / "model_index.json").is_file():
        from edgegen.export import testing

        if emulated:
            testing.make_tiny_diffusion_checkpoint(ckpt, image_size=size)
        else:
            testing.make_sd_turbo_checkpoint(ckpt)
    timings["checkpoint_s"] = time.perf_counter() - t
    t = time.perf_counter()
    if not (bundle / "manifest.json").is_file():
        from edgegen.export import export_checkpoint

        export_checkpoint(
            ckpt,
            bundle,
            precisions=precision,
            overwrite=True,
            progress=False,
            family_options=None if emulated else {"image_size": size, "fused_steps": [1]},
        )
    timings["export_s"] = time.perf_counter() - t
    from edgegen.runtime import Pipeline

    pipe = Pipeline.from_bundle(bundle, backend="ort-cuda", precision=precision, mode="loop")
    shape = json.loads((bundle / "manifest.json").read_text())["generation"]["latent_shape"]
    result = {
        "bundle": str(bundle),
        "image_size": size,
        "precision": precision,
        "steps": 1,
        **timings,
        "edgegen": {},
        "diffusers": {},
    }
    eager = _diffusers_stages(ckpt, precision, emulated)
    for batch in map(int, batches.split(",")):
        latents = np.random.default_rng(0).standard_normal((batch, *shape), dtype=np.float32)
        prompts = (PROMPTS * batch)[:batch]
        edgegen_stages, eager_stages = [], []
        for k in range(rounds + 1):  # the first round warms up both
            call_one_step(pipe, prompts, latents)
            stages = {s: v / 1e6 for s, v in pipe.last_call.stages.items()}
            stages["end_to_end"] = pipe.last_call.total_ns / 1e6
            eager_run = eager(prompts, latents)
            if k:
                edgegen_stages.append(stages)
                eager_stages.append(eager_run)
        result["edgegen"][batch] = {
            s: float(np.median([r[s] for r in edgegen_stages])) for s in edgegen_stages[0]
        }
        result["diffusers"][batch] = {
            s: float(np.median([r[s] for r in eager_stages])) for s in eager_stages[0]
        }
        result.setdefault("speedup_vs_diffusers", {})[batch] = (
            result["diffusers"][batch]["end_to_end"] / result["edgegen"][batch]["end_to_end"]
        )
    result["ok"] = True
    return result


def call_one_step(pipe, prompts, latents) -> None:
    """One 1-step call, pixels as the graphs make them."""
    seeds = list(range(len(prompts)))
    pipe(prompts, seed=seeds, latents=latents, num_inference_steps=1, output_type="uint8")


def _diffusers_stages(ckpt: Path, precision: str, emulated: bool):
    """diffusers eager, stage by stage (text encoder, UNet step, VAE decoder), ms; on the GPU in fp16."""
    import diffusers
    import torch

    device = "cpu" if emulated else "cuda"
    dtype = torch.float16 if precision == "fp16" and not emulated else torch.float32
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(
        ckpt, local_files_only=True, torch_dtype=dtype
    ).to(device)
    pipe.set_progress_bar_config(disable=True)

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    @torch.no_grad()
    def stages(prompts, latents):
        out, start = {}, time.perf_counter()
        t = start
        ids = pipe.tokenizer(
            prompts,
            padding="max_length",
            max_length=pipe.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(device)
        states = pipe.text_encoder(ids)[0]
        sync()
        out["text_encoder"], t = (time.perf_counter() - t) * 1e3, time.perf_counter()
        pipe.scheduler.set_timesteps(1)
        x = torch.from_numpy(latents).to(device, dtype) * pipe.scheduler.init_noise_sigma
        step = pipe.scheduler.timesteps[0]
        eps = pipe.unet(pipe.scheduler.scale_model_input(x, step), step, encoder_hidden_states=states).sample
        x = pipe.scheduler.step(eps, step, x).prev_sample
        sync()
        out["unet"], t = (time.perf_counter() - t) * 1e3, time.perf_counter()
        pipe.vae.decode(x / pipe.vae.config.scaling_factor)
        sync()
        out["vae_decoder"] = (time.perf_counter() - t) * 1e3
        out["end_to_end"] = (time.perf_counter() - start) * 1e3
        return out

    return stages


def run_child(kind: str, args: list[str]) -> int:
    if os.environ.get(EMULATE_ENV):
        activate_emulation()
    if kind == "edgegen":
        from edgegen.runtime.cli import main as edgegen

        return edgegen(args)
    handlers = {
        "versions": child_versions,
        "bundle": child_bundle,
        "parity": child_parity,
        "diffusion": child_diffusion,
    }
    print(json.dumps(handlers[kind](*args)), flush=True)
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        return run_child(argv[1], argv[2:])
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget", type=float, default=480, help="seconds for the whole check (default 480)")
    p.add_argument(
        "--out", default="gpu-check", help="where results.json and results.md go (default gpu-check)"
    )
    p.add_argument("--emulate", action="store_true", help="rehearse on this CPU with the CUDA host emulation")
    p.add_argument("--bundle", help="the default model's bundle, already exported (default: export it once)")
    p.add_argument(
        "--diffusion-checkpoint",
        help="a diffusers checkpoint already made (default: make the SD-Turbo architecture under --out)",
    )
    p.add_argument("--diffusion-bundle", help="its bundle, already exported (default: export it under --out)")
    args = p.parse_args(argv)
    args.argv = argv
    return check(args)


if __name__ == "__main__":
    raise SystemExit(main())
