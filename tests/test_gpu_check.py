"""benchmarks/gpu_check.py rehearsed on this CPU (--emulate): every step runs through the CUDA host emulation
with tiny models, and its JSON and Markdown results say what ran and what it measured."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_gpu_check_emulated_writes_every_step(tmp_path, bert_bundle, diffusion_checkpoint, diffusion_bundle):
    out = tmp_path / "check"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.gpu_check",
            "--emulate",
            "--out",
            str(out),
            "--budget",
            "300",
            "--bundle",
            str(bert_bundle),
            "--diffusion-checkpoint",
            str(diffusion_checkpoint),
            "--diffusion-bundle",
            str(diffusion_bundle),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=400,
    )
    report = json.loads((out / "results.json").read_text())
    steps = {s["name"]: s for s in report["steps"]}
    assert proc.returncode == 0, [
        (s["name"], s["status"], s.get("stderr_tail")) for s in report["steps"] if not s["ok"]
    ]
    assert report["finished"] and report["emulated"]
    assert {s["step"] for s in report["steps"]} == {"1", "2", "3", "4", "5"}
    doctor = steps["edgegen doctor"]["result"]
    assert doctor["backends"]["ort-cuda"]["ok"] and doctor["backends"]["ort-cuda"]["max_abs_pixel_diff"] <= 1
    benches = [s["bench"] for s in report["steps"] if s.get("bench")]
    assert [(b["backend"], b["batch"], b["cuda_graphs"]) for b in benches[:2]] == [
        ("ort-cuda", 2, True),
        ("ort-cuda", 2, False),
    ]
    assert all(b["end_to_end_ms_p50"] >= b["engine_ms_p50"] > 0 for b in benches)
    assert steps["parity vs ort-cpu fp32"]["result"]["precisions"]["fp32"]["max_abs_pixel_diff"] <= 1
    diffusion = steps["SD-Turbo architecture: edgegen ort-cuda vs diffusers eager"]["result"]
    assert set(diffusion["edgegen"]) == set(diffusion["diffusers"]) == {"1", "2"}
    assert {"unet", "vae_decoder", "end_to_end"} <= set(diffusion["diffusers"]["1"])
    assert len(report["overhead_ms_p50_with_cuda_graphs"]) == 2
    markdown = (out / "results.md").read_text()
    assert (
        markdown.startswith("# GPU check (emulated on the CPU)")
        and "| 3 | bench ort-cuda fp32 batch 2 graphs on | ok |" in markdown
    )
    assert "Runtime overhead per call" in markdown
