"""The bench harness: its figures are consistent with each other (not timed tests)."""
import json

import numpy as np

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


def test_bench_cli_json(bert_bundle, capsys):
    assert main(["bench", str(bert_bundle), "--iterations", "5", "--warmup", "1", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    for key in ("backend", "precision", "batch", "iterations", "end_to_end_ms", "stages_ms", "engine_ms", "overhead_ms"):
        assert key in data
    assert set(data["end_to_end_ms"]) >= {"p50", "p95", "p99", "mean"} and "p50" in data["overhead_ms"]
    assert main(["bench", str(bert_bundle), "--iterations", "3", "--warmup", "0"]) == 0
    assert "overhead" in capsys.readouterr().out
    # the prompt sets the work: "cat" is 3 tokens with the tiny bert tokenizer, the default prompt more
    assert main(["bench", str(bert_bundle), "--iterations", "3", "--warmup", "0", "--json", "--prompt", "cat"]) == 0
    short = json.loads(capsys.readouterr().out)
    assert short["prompt"] == "cat" and short["sequence"] == 3 and data["sequence"] > 3
    assert main(["bench", str(bert_bundle), "--prompt", " "]) == 2 and "--prompt" in capsys.readouterr().err
