"""Export: atomic writes, parity failures named, checkpoints refused with reasons."""

import json

import pytest
import torch
from edgegen.export import export_checkpoint
from edgegen.export.families import gan as gan_family
from edgegen.runtime import CheckpointError, ValidationFailedError
from edgegen.runtime.bundle import SCHEMA, sha256_file


def leftovers(parent, name):
    return [p.name for p in parent.iterdir() if p.name.startswith(f".{name}") or p.name == name]


def test_manifest_contents(bert_bundle):
    m = json.loads((bert_bundle / "manifest.json").read_text())
    assert m["schema"] == SCHEMA and m["family"] == "gan" and m["precisions"] == ["fp32"]
    for rel, entry in m["files"].items():
        assert sha256_file(bert_bundle / rel) == entry["sha256"]
        assert (bert_bundle / rel).stat().st_size == entry["bytes"]
    assert set(m["files"]) == {
        "tokenizer.json",
        "reference.npz",
        "report.json",
        "onnx/text_encoder.fp32.onnx",
        "onnx/generator.fp32.onnx",
        "onnx/fused.fp32.onnx",
        "onnx/weights.fp32.bin",
    }
    fused = m["components"]["fused"]
    assert [t["name"] for t in fused["inputs"]] == ["input_ids", "attention_mask", "noise"]
    assert fused["outputs"][0] == {"name": "pixels", "dtype": "uint8", "shape": ["batch", 16, 16, 3]}
    assert fused["inputs"][0]["shape"] == ["batch", "sequence"] and fused["outputs"][1]["shape"][:2] == [
        "batch",
        "sequence",
    ]
    assert m["tokenizer"]["max_length"] == 16 and m["tokenizer"]["pad_token"] == "[PAD]"
    assert m["tokenizer"]["padding"] == "dynamic"
    prov = m["provenance"]
    assert (
        len(prov["checkpoint_sha256"]) == 64 and prov["torch"] and prov["onnxruntime"] and prov["export_date"]
    )
    report = json.loads((bert_bundle / "report.json").read_text())
    assert report["ok"] and report["tokenizer"]["ok"] and report["tokenizer"]["truncation_reported"]
    assert [c["input_ids"][0] for c in report["cases"]] == [1, 3]


def test_graphs_are_cleaned(bert_bundle):
    import onnx

    model = onnx.load(str(bert_bundle / "onnx" / "fused.fp32.onnx"))
    ops = {n.op_type for n in model.graph.node}
    assert "Identity" not in ops and "Constant" not in ops, ops
    used = {i for n in model.graph.node for i in n.input}
    assert all(init.name in used for init in model.graph.initializer)


def test_weights_are_stored_once(bert_bundle):
    """The fused graph's weights are the split graphs' weights: one shared file holds each tensor once."""
    import onnx

    refs = {}
    for comp in ("text_encoder", "generator", "fused"):
        model = onnx.load(str(bert_bundle / "onnx" / f"{comp}.fp32.onnx"), load_external_data=False)
        refs[comp] = {
            tuple(e.value for e in t.external_data)
            for t in model.graph.initializer
            if t.data_location == onnx.TensorProto.EXTERNAL
        }
    assert refs["text_encoder"] and refs["generator"]
    shared = (refs["text_encoder"] | refs["generator"]) & refs["fused"]
    assert len(shared) >= 0.8 * len(refs["text_encoder"] | refs["generator"])
    referenced = sum(int(r[2]) for r in set().union(*refs.values()))
    assert (bert_bundle / "onnx" / "weights.fp32.bin").stat().st_size < referenced + 64 * len(
        set().union(*refs.values())
    )


def test_failed_export_leaves_nothing(tiny_checkpoints, tmp_path, monkeypatch):
    from edgegen.export import exporter

    def boom(*a, **k):
        raise KeyboardInterrupt  # as if the user pressed Ctrl-C mid-trace

    monkeypatch.setattr(exporter, "export_component", boom)
    with pytest.raises(KeyboardInterrupt):
        export_checkpoint(tiny_checkpoints["bert"], tmp_path / "out", progress=False)
    assert leftovers(tmp_path, "out") == []


def test_parity_failure_names_component_and_output(tiny_checkpoints, tmp_path, monkeypatch):
    original = gan_family.GanFamily.components

    def strict(self):
        comps = original(self)
        comps[1].tolerance = {"image": 0.0}
        comps[1].module = _Perturbed(comps[1].module)
        return comps

    monkeypatch.setattr(gan_family.GanFamily, "components", strict)
    with pytest.raises(ValidationFailedError, match=r"generator\.image: max abs error .* > tolerance 0"):
        export_checkpoint(tiny_checkpoints["bert"], tmp_path / "out", progress=False)
    assert leftovers(tmp_path, "out") == []


class _Perturbed(torch.nn.Module):
    """Traces like the generator but PyTorch's own output is shifted: ONNX and PyTorch then disagree."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, *args):
        out = self.inner(*args)
        return out + 1e-3 if not torch.jit.is_tracing() and not torch.onnx.is_in_onnx_export() else out


def test_pickle_checkpoint_refused(tiny_checkpoints, tmp_path):
    import shutil

    ckpt = shutil.copytree(tiny_checkpoints["bert"], tmp_path / "ckpt")
    weights = ckpt / "generator" / "model.safetensors"
    torch.save({"w": torch.zeros(1)}, ckpt / "generator" / "model.pt")
    weights.unlink()
    with pytest.raises(CheckpointError, match="safetensors only"):
        export_checkpoint(ckpt, tmp_path / "out", progress=False)


def test_family_base_declares_what_the_exporter_and_checks_call():
    """Every member export/ (outside export/families) calls on a family is declared, documented, in Family."""
    import inspect
    import re
    from pathlib import Path

    from edgegen.export import exporter
    from edgegen.export.families import Family

    export_dir = Path(exporter.__file__).parent
    called = set()
    for path in export_dir.glob("*.py"):
        called |= set(re.findall(r"\bfamily\.(\w+)", path.read_text()))
    assert {"tokenizer_json", "reference_outputs", "calibration_cases"} <= called  # the scan finds the calls
    for member in sorted(called):
        assert hasattr(Family, member), f"Family does not declare {member}"
        value = inspect.getattr_static(Family, member)
        if callable(value) or isinstance(value, classmethod):
            assert inspect.getdoc(getattr(Family, member)), f"Family.{member} has no docstring"


def test_checkpoint_hash_follows_links(tiny_checkpoints, tmp_path):
    """The default model's checkpoint is a directory of links: its hash is its files', not the empty one."""
    import hashlib
    import shutil

    from edgegen.export.exporter import checkpoint_hash

    real = tiny_checkpoints["bert"]
    linked = tmp_path / "linked"
    linked.mkdir()
    for part in real.iterdir():
        (linked / part.name).symlink_to(part.resolve(), target_is_directory=part.is_dir())
    (linked / "loop").symlink_to(linked, target_is_directory=True)  # a loop is not followed
    copied = shutil.copytree(real, tmp_path / "copied")
    assert checkpoint_hash(linked) != hashlib.sha256().hexdigest()
    assert checkpoint_hash(linked) == checkpoint_hash(real) == checkpoint_hash(copied)
    config = copied / "generator" / "config.json"
    config.write_text(config.read_text() + " ")
    assert checkpoint_hash(copied) != checkpoint_hash(real)


def test_unknown_checkpoint(tmp_path):
    (tmp_path / "ckpt").mkdir()
    with pytest.raises(CheckpointError, match="no known family"):
        export_checkpoint(tmp_path / "ckpt", tmp_path / "out", progress=False)


def test_force_replaces_bundle(tiny_checkpoints, tmp_path):
    out = export_checkpoint(tiny_checkpoints["t5"], tmp_path / "b", progress=False)
    first = (out / "manifest.json").stat().st_ino
    export_checkpoint(tiny_checkpoints["t5"], tmp_path / "b", progress=False, overwrite=True)
    assert (out / "manifest.json").stat().st_ino != first  # a new directory was swapped in
    assert leftovers(tmp_path, "b") == ["b"]
