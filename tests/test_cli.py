"""Each CLI command's happy path, its --json keys, and its errors (one line, no traceback, exit code)."""
import json
import subprocess
import sys

import pytest
from PIL import Image

from edgegen.runtime.cli import main


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_export_json(capsys, tiny_checkpoints, tmp_path):
    code, out, _ = run(capsys, "export", tiny_checkpoints["gpt2"], "-o", tmp_path / "b", "--quiet", "--json")
    data = json.loads(out)
    assert code == 0 and data["ok"] is True and data["bundle"] == str(tmp_path / "b")
    assert (tmp_path / "b" / "manifest.json").is_file()


def test_export_refuses_existing_output(capsys, tiny_checkpoints, bert_bundle):
    code, _, err = run(capsys, "export", tiny_checkpoints["bert"], "-o", bert_bundle, "--quiet")
    assert code == 2 and "already exists" in err and "Traceback" not in err


def test_generate(capsys, bert_bundle, tmp_path):
    code, out, _ = run(capsys, "generate", "a red apple", "--bundle", bert_bundle, "--seed", 3, "-n", 2,
                       "-o", tmp_path / "img.png", "--json")
    data = json.loads(out)
    assert code == 0 and data["seeds"] == [3, 4] and data["backend"] == "ort-cpu" and data["precision"] == "fp32"
    for path in data["images"]:
        assert Image.open(path).size == (16, 16)


def test_generate_reports_truncation(capsys, bert_bundle, tmp_path):
    code, _, err = run(capsys, "generate", "word " * 100, "--bundle", bert_bundle, "-o", tmp_path / "t.png")
    assert code == 0 and "warning: prompt truncated" in err


def test_inspect(capsys, bert_bundle):
    code, out, _ = run(capsys, "inspect", bert_bundle)
    assert code == 0 and "fused" in out and "edgegen.bundle/1" in out
    code, out, _ = run(capsys, "inspect", bert_bundle, "--json")
    data = json.loads(out)
    assert data["manifest"]["schema"] == "edgegen.bundle/1" and data["report_ok"] is True
    assert set(data["manifest"]["components"]) == {"text_encoder", "generator", "fused"}


def test_validate_json(capsys, bert_bundle):
    code, out, _ = run(capsys, "validate", bert_bundle, "--json")
    data = json.loads(out)
    assert code == 0 and data["ok"] is True
    parity = data["precisions"]["fp32"]["parity"]
    for comp in ("text_encoder", "generator", "fused"):
        assert {"max_abs", "tolerance", "ok"} <= set(parity[comp]) and parity[comp]["ok"]
    assert data["precisions"]["fp32"]["quality"]["psnr_db"] >= 40


def test_validate_fails_on_a_bad_graph(capsys, bundle_copy):
    """Change one generator weight and re-hash it, as a faulty converter would: validation must fail, exit 1."""
    from edgegen.runtime.bundle import file_entry
    m = json.loads((bundle_copy / "manifest.json").read_text())
    gen = bundle_copy / "onnx" / "generator.fp32.onnx"
    import numpy as np
    import onnx
    from onnx import numpy_helper
    model = onnx.load(str(gen))
    init = max(model.graph.initializer, key=lambda t: np.prod(t.dims))
    arr = numpy_helper.to_array(init).copy()
    arr.flat[0] += 10.0
    init.CopyFrom(numpy_helper.from_array(arr, init.name))
    onnx.save(model, str(gen))
    m["files"]["onnx/generator.fp32.onnx"] = file_entry(bundle_copy, "onnx/generator.fp32.onnx")
    (bundle_copy / "manifest.json").write_text(json.dumps(m))
    code, out, _ = run(capsys, "validate", bundle_copy, "--json")
    data = json.loads(out)
    assert code == 1 and data["ok"] is False and data["precisions"]["fp32"]["parity"]["generator"]["ok"] is False


def test_doctor_json(capsys, bert_bundle):
    code, out, _ = run(capsys, "doctor", "--bundle", bert_bundle, "--json")
    data = json.loads(out)
    assert code == 0 and data["ok"] is True
    cpu = data["backends"]["ort-cpu"]
    assert cpu["ok"] is True and cpu["max_abs_pixel_diff"] <= 1 and cpu["error"] is None
    assert set(data["backends"]) >= {"ort-cpu", "ort-cuda", "ort-trt"}


@pytest.mark.slow
def test_doctor_with_tiny_export(capsys):
    code, out, _ = run(capsys, "doctor", "--json")
    data = json.loads(out)
    assert code == 0 and data["ok"] and data["backends"]["ort-cpu"]["max_abs_pixel_diff"] <= 1


@pytest.mark.parametrize("argv,code,fragment", [
    (["generate", "x", "--bundle", "/nonexistent", "-o", "x.png"], 1, "not a directory"),
    (["generate", "x", "--bundle", "{bundle}", "--seed", "-4", "-o", "x.png"], 2, "seed"),
    (["generate", "x", "--bundle", "{bundle}", "--backend", "warp", "-o", "x.png"], 2, "unknown backend"),
    (["generate", "x", "--bundle", "{bundle}", "-o", "x.gif"], 2, "extension"),
    (["inspect", "/nonexistent"], 1, "not a directory"),
])
def test_errors_are_one_line_without_traceback(argv, code, fragment, bert_bundle, tmp_path):
    argv = [a.replace("{bundle}", str(bert_bundle)) for a in argv]
    result = subprocess.run([sys.executable, "-m", "edgegen.runtime.cli", *argv], capture_output=True, text=True,
                            cwd=tmp_path)
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr and fragment in result.stderr
    assert result.stderr.startswith("edgegen: ") and len(result.stderr.strip().splitlines()) == 1


def test_help_explains_every_command():
    result = subprocess.run([sys.executable, "-m", "edgegen.runtime.cli", "--help"], capture_output=True, text=True)
    for command in ("export", "engines", "generate", "inspect", "validate", "doctor"):
        assert command in result.stdout
