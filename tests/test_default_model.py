"""The shipped default model (emoji64): exported once into the cache, used by generate/bench/validate
without --bundle, and scored on the device by its own judge."""

import json
from pathlib import Path

import pytest
from edgegen.export.default import MODEL_DIR

pytestmark = pytest.mark.skipif(
    not (MODEL_DIR / "generator" / "model.safetensors").is_file(),
    reason="the trained emoji64 weights are not in this checkout",
)


@pytest.fixture(scope="module")
def cache(default_model_cache):
    return default_model_cache


@pytest.fixture(scope="module")
def default(default_model):
    return default_model


def test_generate_without_bundle_exports_once_then_reuses(default, cache, tmp_path, capsys):
    from edgegen.runtime.cli import main
    from PIL import Image

    manifest = Path(default) / "manifest.json"
    before = manifest.stat().st_mtime_ns
    assert (
        main(["generate", "a rocket on a blue background", "-o", str(tmp_path / "rocket.png"), "--seed", "3"])
        == 0
    )
    assert Image.open(tmp_path / "rocket.png").size == (64, 64)
    assert manifest.stat().st_mtime_ns == before  # reused, not exported again
    assert [p.name for p in cache.iterdir() if p.name.startswith("emoji64-0")] == [Path(default).name]


def test_default_bundle_has_judge_and_all_precisions(default):
    from edgegen.runtime import Bundle

    bundle = Bundle.open(default)
    assert bundle.precisions == ["fp32", "fp16", "int8"] and "judge" in bundle.components
    assert bundle.report()["ok"] is True


def test_validate_reports_adherence_matching_training(default, capsys):
    from edgegen.runtime.cli import main

    assert main(["validate", "--precision", "fp32", "--json"]) in (0, 1)
    report = json.loads(capsys.readouterr().out)
    quality = report["precisions"]["fp32"]["quality"]
    trained = json.loads((MODEL_DIR / "metrics.json").read_text())
    for split in ("seen", "heldout"):
        assert 0.0 <= quality["adherence"][split] <= 1.0
        # the runtime reproduces what training measured with PyTorch (same prompts, seeds and judge)
        assert abs(quality["adherence"][split] - trained[f"adherence_{split}"]) <= 0.03
    assert quality["diversity"] > 0 and quality["frechet_judge_distance"] > 0


def test_bench_without_bundle(default, capsys):
    from edgegen.runtime.cli import main

    assert main(["bench", "--iterations", "5", "--warmup", "1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)["runs"][0]
    assert result["bundle"] == str(default) and result["family"] == "gan"


def test_validate_one_precision_gates_adherence_against_the_exported_fp32(default, capsys):
    """`validate --precision int8` does not score fp32 again: the adherence gate compares with the fp32
    adherence the export recorded, and says so (it used to report the gate metric as missing)."""
    from edgegen.runtime.cli import main

    code = main(["validate", "--precision", "int8"])
    text = capsys.readouterr().out
    assert code == 0 and "not measured" not in text, text
    assert main(["validate", "--precision", "int8", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert "fp32" not in report["precisions"]
    from edgegen.runtime import Bundle

    exported = Bundle.open(default).report()["precisions"]["fp32"]["quality"]["adherence"]
    for form in ("int8", "int8-qdq"):
        quality = report["precisions"][form]["quality"]
        assert quality["adherence_fp32_from"] == "report.json (export)"
        want = min(quality["adherence"][k] - exported[k] for k in ("seen", "heldout"))
        assert abs(quality["adherence_vs_fp32"] - want) < 1e-12
        assert report["precisions"][form]["gate"]["checks"]["adherence_vs_fp32"]["ok"]


def test_generate_json_says_what_it_drew_and_warns_on_an_unknown_subject(default, tmp_path, capsys):
    from edgegen.runtime.cli import main

    assert main(["generate", "a rocket on a blue background", "-o", str(tmp_path / "r.png"), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    read = data["read"][0]
    assert (read["subject"]["name"], read["background"]["name"]) == ("rocket", "blue")
    assert read["subject"]["p"] > 0.5 and data["warnings"] == []
    assert main(["generate", "an astronaut riding a horse", "-o", str(tmp_path / "a.png"), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    [note] = data["warnings"]
    assert (
        note.startswith("emoji64 knows no 'astronaut riding") and data["read"][0]["subject"]["name"] in note
    )
    assert main(["generate", "an astronaut riding a horse", "-o", str(tmp_path / "a.png")]) == 0
    assert "emoji64 knows no 'astronaut riding" in capsys.readouterr().err


def test_model_card_lists_what_it_knows():
    card = (MODEL_DIR / "MODEL_CARD.md").read_text()
    labels = json.loads((MODEL_DIR / "labels.json").read_text())
    assert all(f"`{e['name']}`" in card for e in labels["emoji"])
    assert all(b["name"] in card for b in labels["backgrounds"])
