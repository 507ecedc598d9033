"""The bench harness: its figures are consistent with each other (not timed tests)."""

import json

import numpy as np
import pytest
from edgegen.runtime import Pipeline
from edgegen.runtime.bench import run_bench, summarize
from edgegen.runtime.cli import main


def test_summarize_percentiles():
    s = summarize(list(range(1, 101)))
    assert s["p50"] == np.percentile(range(1, 101), 50) and s["p99"] > s["p95"] > s["p50"] and s["min"] == 1


def test_stages_add_up_to_end_to_end(bert_bundle):
    pipe = Pipeline.from_bundle(bert_bundle, backend="ort-cpu")
    r = run_bench(pipe, batch=2, iterations=20, warmup=2)
    assert r["iterations"] == 20 and r["path"] == "fused"
    stage_sum = sum(s["p50"] for s in r["stages_ms"].values())
    # medians of stages need not add up exactly to the median call, but close
    assert 0.5 * r["end_to_end_ms"]["p50"] <= stage_sum <= 1.5 * r["end_to_end_ms"]["p50"]
    assert r["stages_ms"]["fused"]["engine"] and not r["stages_ms"]["tokenize"]["engine"]
    assert abs(r["engine_ms"]["p50"] - r["stages_ms"]["fused"]["p50"]) < 0.5 * r["engine_ms"]["p50"]
    assert r["overhead_ms"]["p50"] >= 0 and r["repeated_prompt_ms"]["p50"] > 0
    assert r["images_per_s"] > 0 and r["peak_rss_mb"] > 0


def test_each_call_is_accounted_for(bert_bundle):
    pipe = Pipeline.from_bundle(bert_bundle, backend="ort-cpu", mode="split")
    pipe("a red apple", seed=1)
    info = pipe.last_call
    assert list(info.stages) == ["checks", "tokenize", "text_encoder", "noise", "generator", "output"]
    assert sum(info.stages.values()) <= info.total_ns and info.engine_ns > 0
    assert info.total_ns - sum(info.stages.values()) < 0.2 * info.total_ns  # the clock reads between stages


def one_run(capsys) -> dict:
    """bench --json's one run, checking the shape of one precision's output: a list of one, no ratio."""
    data = json.loads(capsys.readouterr().out)
    assert data["ok"] is True and len(data["runs"]) == 1 and "speedup_vs_fp32" not in data
    return data["runs"][0]


def test_bench_cli_json(bert_bundle, capsys):
    assert main(["bench", str(bert_bundle), "--iterations", "5", "--warmup", "1", "--json"]) == 0
    data = one_run(capsys)
    for key in (
        "backend",
        "precision",
        "batch",
        "iterations",
        "end_to_end_ms",
        "stages_ms",
        "engine_ms",
        "overhead_ms",
    ):
        assert key in data
    assert set(data["end_to_end_ms"]) >= {"p50", "p95", "p99", "mean"} and "p50" in data["overhead_ms"]
    assert main(["bench", str(bert_bundle), "--iterations", "3", "--warmup", "0"]) == 0
    assert "overhead" in capsys.readouterr().out
    # the prompt sets the work: "cat" is 3 tokens with the tiny bert tokenizer, the default prompt more
    assert (
        main(["bench", str(bert_bundle), "--iterations", "3", "--warmup", "0", "--json", "--prompt", "cat"])
        == 0
    )
    short = one_run(capsys)
    assert short["prompt"] == "cat" and short["sequence"] == 3 and data["sequence"] > 3
    assert main(["bench", str(bert_bundle), "--prompt", " "]) == 2 and "--prompt" in capsys.readouterr().err


@pytest.fixture(scope="module")
def two_precisions(tiny_checkpoints, tmp_path_factory):
    from edgegen.export import export_checkpoint

    return export_checkpoint(
        tiny_checkpoints["bert"],
        tmp_path_factory.mktemp("bench") / "b",
        precisions="fp32,fp16",
        progress=False,
    )


def test_several_precisions_take_turns_in_one_run(two_precisions):
    from edgegen.runtime.bench import run_benches

    pipes = {
        p: Pipeline.from_bundle(two_precisions, backend="ort-cpu", precision=p) for p in ("fp16", "fp32")
    }
    order = []

    def recording(generate, name):  # record which pipeline each call went to
        def call(*a, **k):
            order.append(name)
            return generate(*a, **k)

        return call

    for name, pipe in pipes.items():
        pipe._generate = recording(pipe._generate, name)
    r = run_benches(pipes, iterations=7, warmup=1, block=3)
    assert [run["iterations"] for run in r["runs"]] == [7, 7]
    assert r["interleaved"] == {"block": 3, "rounds": 3}
    assert [run["precision"] for run in r["runs"]] == ["fp16", "fp32"]
    timed = order[2 : 2 + 14]  # after one warm-up call each; then blocks of 3, the order rotating each round
    assert timed == ["fp16"] * 3 + ["fp32"] * 3 + ["fp32"] * 3 + ["fp16"] * 3 + ["fp16"] + ["fp32"]
    fp16, fp32 = r["runs"]
    want = fp32["end_to_end_ms"]["p50"] / fp16["end_to_end_ms"]["p50"]
    assert r["speedup_vs_fp32"] == {"fp16": want, "fp32": 1.0}


def test_bench_cli_several_precisions(two_precisions, bert_bundle, capsys):
    assert (
        main(
            [
                "bench",
                str(two_precisions),
                "--precision",
                "fp16,fp32",
                "--iterations",
                "4",
                "--warmup",
                "0",
                "--json",
            ]
        )
        == 0
    )
    data = json.loads(capsys.readouterr().out)
    assert data["ok"] is True and [run["precision"] for run in data["runs"]] == ["fp16", "fp32"]
    assert data["speedup_vs_fp32"]["fp32"] == 1.0 and data["speedup_vs_fp32"]["fp16"] > 0
    assert set(data["speedup_vs_fp32"]) == {"fp16", "fp32"}
    assert all("overhead_ms" in run and "end_to_end_ms" in run for run in data["runs"])
    assert (
        main(["bench", str(two_precisions), "--precision", "fp16,fp32", "--iterations", "2", "--warmup", "0"])
        == 0
    )
    out = capsys.readouterr().out
    assert (
        out.count("edgegen bench") == 2
        and "interleaved in one process" in out
        and "fp16 " in out.splitlines()[-1]
    )
    assert (
        main(["bench", str(bert_bundle), "--precision", "auto,fp32"]) == 2
        and "auto" in capsys.readouterr().err
    )
    assert (
        main(["bench", str(bert_bundle), "--precision", "fp32,int8"]) == 2
        and "no int8" in capsys.readouterr().err
    )
