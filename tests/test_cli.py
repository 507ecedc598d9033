"""Each CLI command's happy path, its --json keys, and its errors (one line, no traceback, exit code)."""

import json
import subprocess
import sys

import pytest
from edgegen.runtime.cli import main
from PIL import Image


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
    code, out, _ = run(
        capsys,
        "generate",
        "a red apple",
        "--bundle",
        bert_bundle,
        "--seed",
        3,
        "-n",
        2,
        "-o",
        tmp_path / "img.png",
        "--json",
    )
    data = json.loads(out)
    assert code == 0 and data["ok"] is True and data["seeds"] == [3, 4]
    assert data["backend"] == "ort-cpu" and data["precision"] == "fp32"
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
    assert data["ok"] is True and data["report_ok"] is True
    assert data["manifest"]["schema"] == "edgegen.bundle/1"
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
    """Change one generator weight and re-hash it, as a faulty converter would: validation must fail,
    exit 1."""
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
    assert (
        code == 1 and data["ok"] is False and data["precisions"]["fp32"]["parity"]["generator"]["ok"] is False
    )


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


@pytest.mark.parametrize(
    "argv,code,fragment",
    [
        (["generate", "x", "--bundle", "/nonexistent", "-o", "x.png"], 1, "not a directory"),
        (["generate", "x", "--bundle", "{bundle}", "--seed", "-4", "-o", "x.png"], 2, "seed"),
        (["generate", "x", "--bundle", "{bundle}", "-o", "x.gif"], 2, "extension"),
        (["inspect", "/nonexistent"], 1, "not a directory"),
    ],
)
def test_errors_are_one_line_without_traceback(argv, code, fragment, bert_bundle, tmp_path):
    argv = [a.replace("{bundle}", str(bert_bundle)) for a in argv]
    result = subprocess.run(
        [sys.executable, "-m", "edgegen.runtime.cli", *argv], capture_output=True, text=True, cwd=tmp_path
    )
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr and fragment in result.stderr
    assert result.stderr.startswith("edgegen: ") and len(result.stderr.strip().splitlines()) == 1


def test_help_explains_every_command():
    result = subprocess.run(
        [sys.executable, "-m", "edgegen.runtime.cli", "--help"], capture_output=True, text=True
    )
    for command in ("export", "engines", "generate", "inspect", "validate", "doctor"):
        assert command in result.stdout


def test_version_is_the_installed_one(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out == f"edgegen {version('edgegen')}\n"


@pytest.mark.parametrize(
    "argv",
    [
        ["generate", "x", "-o", "x.png", "--backend", "warp"],
        ["generate", "x", "-o", "x.png", "--precision", "int4"],
        ["generate", "x", "-o", "x.png", "--scheduler", "karras"],
        ["validate", "--precision", "fp64"],
        ["validate", "--backend", "warp"],
        ["bench", "--backend", "warp"],
        ["bench", "--precision", "fp32,int4"],
        ["bench", "--mode", "eager"],
        ["engines", "b", "--flavour", "onnx"],
        ["export", "ckpt", "-o", "b", "--precision", "fp32,int4"],
        ["export", "ckpt", "-o", "b", "--engines", "onnx"],
    ],
)
def test_enumerations_refuse_other_values_as_usage_errors(argv, capsys):
    """Refused by the parser, before any bundle is looked for: usage, then the one value at fault."""
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == "" and err.startswith("usage: edgegen ")
    assert err.splitlines()[-1].startswith(f"edgegen {argv[0]}: error: ") and argv[-1].split(",")[-1] in err


@pytest.mark.parametrize(
    "argv,code,kind,subject,fragment",
    [
        (
            ["generate", "x", "--bundle", "/nonexistent", "-o", "x.png"],
            1,
            "BadBundleError",
            "bundle /nonexistent",
            "not a directory",
        ),
        (
            ["generate", "a \udcff", "--bundle", "{bundle}", "-o", "x.png"],
            2,
            "BadInputError",
            "prompt",
            "not valid Unicode",
        ),  # a byte that is not UTF-8 on the command line
        (["bench", "{bundle}", "--prompt", " "], 2, "BadInputError", "--prompt", "is empty"),
        (
            ["generate", "x", "--bundle", "{bundle}", "--precision", "int4", "-o", "x.png"],
            2,
            "UsageError",
            "edgegen generate",
            "invalid choice: 'int4'",
        ),
        (["bench", "{bundle}", "--precision", "fp32,int8"], 2, "BadInputError", "precision", "no int8"),
        (["inspect"], 2, "BadInputError", "edgegen inspect", "needs a bundle"),
        (
            ["generate", "x", "-o", "x.png", "--no-such-flag"],
            2,
            "UsageError",
            "edgegen",
            "unrecognized arguments",
        ),
    ],
)
def test_json_errors_are_one_object_on_stdout(argv, code, kind, subject, fragment, bert_bundle, tmp_path):
    argv = [a.replace("{bundle}", str(bert_bundle)) for a in argv] + ["--json"]
    result = subprocess.run(
        [sys.executable, "-m", "edgegen.runtime.cli", *argv], capture_output=True, text=True, cwd=tmp_path
    )
    assert result.returncode == code, result.stdout + result.stderr
    data = json.loads(result.stdout)
    assert data["ok"] is False and set(data["error"]) == {"kind", "subject", "message", "note"}
    assert data["error"]["kind"] == kind and data["error"]["subject"] == subject
    assert fragment in data["error"]["message"] and data["error"]["note"]
    assert "Traceback" not in result.stderr


def test_internal_error_in_json_mode(capsys, monkeypatch, bert_bundle):
    import edgegen.runtime.bundle as bundle_module

    def broken(*_, **__):
        raise ZeroDivisionError("a bug")

    monkeypatch.delenv("EDGEGEN_DEBUG", raising=False)
    monkeypatch.setattr(bundle_module.Bundle, "open", broken)
    code, out, err = run(capsys, "inspect", bert_bundle, "--json")
    error = json.loads(out)["error"]
    assert code == 1 and error["kind"] == "InternalError" and error["message"] == "ZeroDivisionError: a bug"
    assert "EDGEGEN_DEBUG" in error["note"] and err == ""
    code, out, err = run(capsys, "inspect", bert_bundle)
    assert code == 1 and out == ""
    assert err.startswith("edgegen: internal error | ZeroDivisionError: a bug. Note:")


@pytest.mark.parametrize("command", ["generate", "bench", "validate", "inspect", "engines", "doctor"])
def test_every_command_takes_bundle_as_an_option(command, capsys, tmp_path):
    """--bundle reaches the command: a missing directory is named in its error (doctor: in each backend's)."""
    missing = tmp_path / "missing"
    argv = {
        "generate": ["generate", "x", "-o", tmp_path / "x.png"],
        "engines": ["engines", "--flavour", "trt"],
    }
    code, out, _ = run(capsys, *argv.get(command, [command]), "--bundle", missing, "--json")
    data = json.loads(out)
    assert code == 1 and data["ok"] is False
    if command == "doctor":
        assert f"bundle {missing} | not a directory" in data["backends"]["ort-cpu"]["error"]
    else:
        assert data["error"]["subject"] == f"bundle {missing}"
        assert data["error"]["message"] == "not a directory"


def test_bundle_positional_or_option_the_same(capsys, bert_bundle, tmp_path):
    for argv in (
        ["inspect", bert_bundle],
        ["inspect", "--bundle", bert_bundle],
        ["inspect", bert_bundle, "--bundle", f"{bert_bundle}/"],
    ):
        code, out, _ = run(capsys, *argv, "--json")
        assert code == 0 and json.loads(out)["manifest"]["family"] == "gan"
    for command in ("inspect", "validate", "bench", "engines"):
        flavour = ["--flavour", "trt"] if command == "engines" else []
        code, _, err = run(capsys, command, bert_bundle, "--bundle", tmp_path, *flavour)
        assert code == 2 and err.startswith("edgegen: --bundle | two different bundles given: ")
