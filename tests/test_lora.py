"""LoRA: fused at export (``--lora``) and merged at load (``Pipeline.from_bundle(..., lora=...)``), both
against diffusers' ``load_lora_weights`` + ``fuse_lora(lora_scale=s)``; two LoRAs (diffusers/PEFT and kohya
naming) adapting the UNet's attention and resnet convolutions and the text encoder's attention."""

import hashlib
import json
import shutil

import numpy as np
import pytest

diffusers = pytest.importorskip("diffusers")
torch = pytest.importorskip("torch")
pytest.importorskip("peft")  # diffusers' LoRA loading

from edgegen.export import export_checkpoint  # noqa: E402
from edgegen.export.testing import make_random_lora  # noqa: E402
from edgegen.runtime import Pipeline  # noqa: E402
from edgegen.runtime.bundle import Bundle  # noqa: E402
from edgegen.runtime.cli import main  # noqa: E402
from edgegen.runtime.diffusion import DiffusionPipeline  # noqa: E402
from edgegen.runtime.errors import BadInputError  # noqa: E402
from edgegen.runtime.lora import LoraMerge, parse_spec, read_safetensors  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402
from test_diffusion import LEVELS, PROMPTS, SEEDS, diffusers_txt2img, levels  # noqa: E402

FP16_LEVELS = 3  # fp16 runtime against diffusers fp32 (measured: 1)


@pytest.fixture(scope="module")
def loras(diffusion_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("loras")
    return {
        "peft": make_random_lora(root / "peft.safetensors", diffusion_checkpoint, seed=1),
        "kohya": make_random_lora(root / "kohya.safetensors", diffusion_checkpoint, seed=2, naming="kohya"),
    }


@pytest.fixture(scope="module")
def bundle(diffusion_checkpoint, tmp_path_factory):
    """fp32 and fp16, fused graphs for 1 and 2 steps."""
    return export_checkpoint(
        diffusion_checkpoint,
        tmp_path_factory.mktemp("lora_bundle") / "b",
        precisions="fp32,fp16",
        progress=False,
        family_options={"fused_steps": [1, 2]},
    )


def with_loras(checkpoint, applied):
    """diffusers' pipeline with each LoRA loaded and fused at its scale, one after the other."""
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(checkpoint, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    for path, scale in applied:
        pipe.load_lora_weights(str(path))
        pipe.fuse_lora(lora_scale=scale)
        pipe.unload_lora_weights()  # keeps the fused weights
    return pipe


CASES = {  # LoRAs (by naming) and scales; each case's images come from diffusers once
    "peft": [("peft", 0.7)],
    "kohya": [("kohya", 1.0)],
    "both": [("peft", 0.7), ("kohya", -0.5)],
}
CALLS = {  # a fused call (1 step) and a loop call with guidance (text encoder and UNet graphs apart)
    "fused": {"steps": 1, "guidance": 0.0},
    "loop": {"steps": 2, "guidance": 3.0},
}


@pytest.fixture(scope="module")
def expected(diffusion_checkpoint, loras):
    """(images, latents) per (case, call), and the images without a LoRA."""
    mp = pytest.MonkeyPatch()
    out = {}
    for case, spec in [("none", []), *CASES.items()]:
        pipe = with_loras(diffusion_checkpoint, [(loras[name], s) for name, s in spec])
        for call, kw in CALLS.items():
            out[case, call] = diffusers_txt2img(pipe, mp, "euler", kw["steps"], guidance=kw["guidance"])
    mp.undo()
    return out


def run(pipe, latents, call):
    kw = CALLS[call]
    return pipe(
        PROMPTS,
        seed=SEEDS,
        latents=latents,
        num_inference_steps=kw["steps"],
        guidance_scale=kw["guidance"],
        output_type="uint8",
    )


def test_the_loras_change_the_images(expected):
    """Each LoRA (and a different scale) moves the images far past the tolerance: the checks can fail."""
    for call in CALLS:
        base = expected["none", call][0]
        assert base.std() > 40
        for case in CASES:
            assert levels(expected[case, call][0], base) > 10 * LEVELS, (case, call)
        assert levels(expected["both", call][0], expected["peft", call][0]) > 10 * LEVELS


@pytest.mark.parametrize("call", CALLS)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_merged_at_load_matches_diffusers(bundle, loras, expected, case, call, precision):
    applied = [(loras[name], scale) for name, scale in CASES[case]]
    pipe = Pipeline.from_bundle(bundle, backend="ort-cpu", precision=precision, lora=applied)
    want, latents = expected[case, call]
    got = run(pipe, latents, call)
    assert pipe.last_call.path == ("fused" if call == "fused" else "loop")
    assert levels(got, want) <= (LEVELS if precision == "fp32" else FP16_LEVELS)


def test_fused_at_export_matches_diffusers(diffusion_checkpoint, loras, expected, tmp_path):
    """Export fuses both LoRAs before tracing; parity and gates ran on the fused model; the manifest records
    each file's hash and scale, and the bundle still takes LoRAs at load."""
    applied = [(loras[name], scale) for name, scale in CASES["both"]]
    out = export_checkpoint(
        diffusion_checkpoint,
        tmp_path / "fused",
        progress=False,
        family_options={"fused_steps": [1], "loras": applied},
    )
    manifest = json.loads((out / "manifest.json").read_text())
    assert [(f["file"], f["scale"]) for f in manifest["lora"]["fused"]] == [(p.name, s) for p, s in applied]
    assert [f["sha256"] for f in manifest["lora"]["fused"]] == [
        hashlib.sha256(p.read_bytes()).hexdigest() for p, _ in applied
    ]
    assert Bundle.open(out).report()["ok"]
    pipe = Pipeline.from_bundle(out, backend="ort-cpu", precision="fp32")
    for call in CALLS:
        want, latents = expected["both", call]
        assert levels(run(pipe, latents, call), want) <= LEVELS, call


def test_without_lora_nothing_changes(bundle, loras, expected):
    """No LoRA: no overrides reach a session, the images are the base model's, and a load with a LoRA
    leaves the bundle's files as they were (its hashes still verify)."""
    pipe = Pipeline.from_bundle(bundle, backend="ort-cpu", precision="fp32")
    assert pipe.lora is None
    want, latents = expected["none", "fused"]
    assert levels(run(pipe, latents, "fused"), want) <= LEVELS
    assert all(g._overrides == [] for g in pipe._graphs.values())
    assert Pipeline.from_bundle(bundle, backend="ort-cpu", precision="fp32", lora=[]).lora is None

    def contents():
        return {
            p: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(bundle.rglob("*")) if p.is_file()
        }

    before = contents()
    for precision in ("fp32", "fp16"):  # both weights files merged from; the fused and loop graphs opened
        styled = Pipeline.from_bundle(
            bundle, backend="ort-cpu", precision=precision, lora=[(loras["peft"], 0.7)]
        )
        assert styled.lora.merged
        for call in CALLS:
            run(styled, expected["peft", call][1], call)
    assert contents() == before
    Bundle.open(bundle, verify_hashes=True)


def test_one_bundle_serves_pipelines_with_different_loras(bundle, loras, expected):
    """Merged weights belong to their pipeline: two pipelines of one bundle, one with a LoRA, one without,
    called in turn, each give their own images."""
    plain = Pipeline.from_bundle(bundle, backend="ort-cpu", precision="fp32")
    styled = Pipeline.from_bundle(bundle, backend="ort-cpu", precision="fp32", lora=[(loras["peft"], 0.7)])
    for pipe, case in ((styled, "peft"), (plain, "none"), (styled, "peft")):
        want, latents = expected[case, "fused"]
        assert levels(run(pipe, latents, "fused"), want) <= LEVELS, case


# ---------------------------------------------------------------- refusals


def test_a_lora_for_another_model_is_refused(bundle, diffusion_checkpoint, loras, tmp_path):
    """Keys that match no weight are named; a LoRA of the right names but other widths is refused on shape;
    at load and at export, before anything is written."""
    tensors, _ = read_safetensors(loras["peft"])
    renamed = {k.replace("attn1.to_q", "attn1.to_query"): v for k, v in tensors.items()}
    save_file(renamed, str(tmp_path / "renamed.safetensors"))
    with pytest.raises(BadInputError, match=r"match no weight of this model: unet\..*attn1\.to_query"):
        Pipeline.from_bundle(
            bundle, backend="ort-cpu", precision="fp32", lora=[tmp_path / "renamed.safetensors"]
        )
    with pytest.raises(BadInputError, match="match no weight"):
        export_checkpoint(
            diffusion_checkpoint,
            tmp_path / "never",
            progress=False,
            family_options={"loras": [(tmp_path / "renamed.safetensors", 1.0)]},
        )
    assert not (tmp_path / "never").exists()
    narrowed = {k: (v[:2] if ".lora_A." in k else v[:, :2]) for k, v in tensors.items()}
    save_file(narrowed, str(tmp_path / "rank2.safetensors"))  # consistent rank 2: still fits
    Pipeline.from_bundle(bundle, backend="ort-cpu", precision="fp32", lora=[tmp_path / "rank2.safetensors"])
    cut = {k: (v[:, :-1] if ".lora_A." in k else v) for k, v in tensors.items()}
    save_file(cut, str(tmp_path / "cut.safetensors"))
    with pytest.raises(BadInputError, match="its delta is"):
        Pipeline.from_bundle(bundle, backend="ort-cpu", precision="fp32", lora=[tmp_path / "cut.safetensors"])


@pytest.mark.parametrize(
    "content,problem",
    [
        (b"", "not a readable safetensors"),
        (b"\xff" * 64, "not a readable safetensors"),
        (b"not a lora at all, just text", "not a readable safetensors"),
    ],
)
def test_a_file_that_is_no_lora_is_refused(bundle, tmp_path, content, problem):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(content)
    with pytest.raises(BadInputError, match=problem):
        Pipeline.from_bundle(bundle, backend="ort-cpu", precision="fp32", lora=[bad])


def test_bad_lora_arguments_are_refused(bundle, loras, tmp_path):
    for lora, problem in (
        ([tmp_path / "missing.safetensors"], "no such file"),
        ([(loras["peft"], "strong")], "not a finite number"),
        ([(loras["peft"], float("nan"))], "not a finite number"),
        ((loras["peft"], 0.8), "is not a file or a \\(file, scale\\) pair"),
    ):
        with pytest.raises(BadInputError, match=problem):
            Pipeline.from_bundle(bundle, backend="ort-cpu", precision="fp32", lora=lora)
    save_file({"unet.x.weight": np.zeros((2, 2), np.float32)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(BadInputError, match="1 of its 1 keys match no weight"):
        Pipeline.from_bundle(
            bundle, backend="ort-cpu", precision="fp32", lora=[tmp_path / "plain.safetensors"]
        )


def test_int8_and_bundles_without_targets_refuse_a_lora_at_load(bundle, loras, bert_bundle, tmp_path):
    lora = [(loras["peft"], 1.0)]
    opened = Bundle.open(bundle)
    for form in ("int8", "int8-qdq"):
        with pytest.raises(BadInputError, match=f"the {form} form cannot take a LoRA at load"):
            LoraMerge(opened, form, lora)
    with pytest.raises(BadInputError, match="records no LoRA targets"):
        Pipeline.from_bundle(bert_bundle, backend="ort-cpu", precision="fp32", lora=lora)
    old = shutil.copytree(bundle, tmp_path / "old")
    manifest = json.loads((old / "manifest.json").read_text())
    del manifest["lora"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BadInputError, match="re-export it"):
        Pipeline.from_bundle(old, backend="ort-cpu", precision="fp32", lora=lora)


def test_weights_export_rewrites_are_not_offered_for_merging(bundle, loras, tmp_path):
    """The upsampler convolutions are traced as sub-pixel convolutions (other weights): the manifest offers
    no plain weight for them, and a LoRA on one is refused at load with the way out (export --lora)."""
    targets = json.loads((bundle / "manifest.json").read_text())["lora"]["targets"]["unet"]
    rewritten = [m for m, t in targets.items() if not t["forms"]]
    assert rewritten == ["up_blocks.0.upsamplers.0.conv"]
    assert all(set(t["forms"]) == {"fp32", "fp16"} for m, t in targets.items() if m not in rewritten)
    rank = 2
    conv = {
        "unet.up_blocks.0.upsamplers.0.conv.lora_A.weight": np.ones((rank, 32, 3, 3), np.float32),
        "unet.up_blocks.0.upsamplers.0.conv.lora_B.weight": np.ones((32, rank, 1, 1), np.float32),
    }
    save_file(conv, str(tmp_path / "up.safetensors"))
    with pytest.raises(BadInputError, match="export with --lora"):
        Pipeline.from_bundle(bundle, backend="ort-cpu", precision="fp32", lora=[tmp_path / "up.safetensors"])


# ---------------------------------------------------------------- file formats


def test_older_diffusers_namings_and_bf16_read_like_peft(bundle, loras, tmp_path):
    """diffusers' older layouts (``lora.down``/``lora.up``, ``lora_linear_layer``, attention processors'
    ``to_q_lora``) and a bfloat16 file give the PEFT file's weights (bf16: within its rounding)."""
    tensors, _ = read_safetensors(loras["peft"])
    alpha_rank = 8.0 / 4  # make_random_lora's default alpha / rank, in the PEFT file's metadata only

    def spelled(key, value):
        stem, role = key.rsplit(".lora_", 1)
        down = role.startswith("A")
        value = value * alpha_rank if not down else value  # no metadata: fold alpha / rank into up
        if stem.startswith("text_encoder."):
            return f"{stem}.lora_linear_layer.{'down' if down else 'up'}.weight", value
        if ".attn1.to_" in stem or ".attn2.to_" in stem:
            head, proj = (
                stem.rsplit(".", 1)
                if not stem.endswith("to_out.0")
                else (stem[: -len(".to_out.0")], "to_out")
            )
            return f"{head}.processor.{proj}_lora.{'down' if down else 'up'}.weight", value
        return f"{stem}.lora.{'down' if down else 'up'}.weight", value

    old = dict(spelled(k, v) for k, v in tensors.items())
    save_file(old, str(tmp_path / "old.safetensors"))
    bf16 = {k: (v.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16) for k, v in old.items()}
    _write_bf16(tmp_path / "bf16.safetensors", bf16)
    opened = Bundle.open(bundle)
    want = LoraMerge(opened, "fp32", [(loras["peft"], 0.7)]).merged
    for name, rtol in (("old", 1e-6), ("bf16", 2e-2)):
        got = LoraMerge(opened, "fp32", [(tmp_path / f"{name}.safetensors", 0.7)]).merged
        assert got.keys() == want.keys()
        for offset, w in want.items():
            base = np.frombuffer(
                opened.path("onnx/weights.fp32.bin").read_bytes(), np.float32, w.size, offset
            )
            np.testing.assert_allclose(
                got[offset] - base.reshape(w.shape),
                w - base.reshape(w.shape),
                rtol=rtol,
                atol=1e-6 if rtol < 1e-3 else 2e-3,
            )


def _write_bf16(path, tensors):
    """A safetensors file of BF16 tensors (given as their uint16 bits), written by hand: numpy has no
    bfloat16 for safetensors.numpy to save."""
    header, blobs, offset = {}, [], 0
    for key, bits in tensors.items():
        data = np.ascontiguousarray(bits).tobytes()
        header[key] = {
            "dtype": "BF16",
            "shape": list(bits.shape),
            "data_offsets": [offset, offset + len(data)],
        }
        blobs.append(data)
        offset += len(data)
    raw = json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + b"".join(blobs))


@pytest.mark.parametrize(
    "text,expected",
    [
        ("style.safetensors", ("style.safetensors", 1.0)),
        ("style.safetensors:0.8", ("style.safetensors", 0.8)),
        ("style.safetensors:-1.5e-1", ("style.safetensors", -0.15)),
        (r"C:\loras\style.safetensors", (r"C:\loras\style.safetensors", 1.0)),
        (r"C:\loras\style.safetensors:.5", (r"C:\loras\style.safetensors", 0.5)),
        ("dir:with:colons/style.safetensors", ("dir:with:colons/style.safetensors", 1.0)),
    ],
)
def test_lora_spec(text, expected):
    assert parse_spec(text) == expected


# ---------------------------------------------------------------- CLI


def test_cli_export_and_generate_with_loras(diffusion_checkpoint, bundle, loras, tmp_path, capsys):
    """export --lora FILE:SCALE fuses; generate --lora merges at load: the same images."""
    peft, kohya = loras["peft"], loras["kohya"]
    args = ["--lora", f"{peft}:0.7", "--lora", f"{kohya}:-0.5"]
    assert main(["export", str(diffusion_checkpoint), "-o", str(tmp_path / "b"), "--quiet", *args]) == 0
    for where, bundle_dir, extra in (("fused", tmp_path / "b", []), ("load", bundle, args)):
        out = tmp_path / f"{where}.png"
        code = main(
            ["generate", "a red apple", "--bundle", str(bundle_dir), "--seed", "5", "-o", str(out), *extra]
        )
        assert code == 0
    from PIL import Image

    a = np.asarray(Image.open(tmp_path / "fused.png"))
    b = np.asarray(Image.open(tmp_path / "load.png"))
    assert levels(a, b) <= LEVELS
    capsys.readouterr()
    assert (
        main(
            [
                "generate",
                "x",
                "--bundle",
                str(bundle),
                "-o",
                str(tmp_path / "x.png"),
                "--lora",
                "nope",
                "--json",
            ]
        )
        == 2
    )
    error = json.loads(capsys.readouterr().out)["error"]
    assert error["kind"] == "BadInputError" and "no such file" in error["message"]


def test_device_graphs_take_the_merged_weights(bundle, loras, expected, monkeypatch, tmp_path):
    """ort-trt's OrtDeviceGraph, over the host emulation of CUDA (tests/gpu_emulation.py: CPU sessions),
    hands the merged weights to every session it makes, and keys its TensorRT engine cache by the LoRAs:
    an engine built with one LoRA's weights is never reused for another. A graph no LoRA reaches (the VAE
    decoder) gets no overrides and keeps the plain cache. Real CUDA is not exercised."""
    from edgegen.runtime import backends, cudart, ort_gpu
    from edgegen.runtime import pipeline as pipeline_module
    from gpu_emulation import HostCuda

    monkeypatch.setenv("EDGEGEN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(ort_gpu, "ORT_DEVICE", "cpu")
    real = backends.make_session
    monkeypatch.setattr(
        backends, "make_session", lambda path, backend, options=None, po=None: real(path, "ort-cpu", options)
    )
    made = []

    def factory(b, component, form, backend, cuda_graphs=None, overrides=None):
        made.append(
            ort_gpu.OrtDeviceGraph(b, component, form, backend, b.components[component], overrides=overrides)
        )
        return made[-1]

    monkeypatch.setattr(pipeline_module, "open_graph", factory)
    previous = cudart.set_runtime(HostCuda())
    try:
        caches = set()
        for case in ("peft", "kohya"):
            applied = [(loras[name], scale) for name, scale in CASES[case]]
            opened = Bundle.open(bundle)
            pipe = DiffusionPipeline(opened, "ort-trt", "fp32", [], lora=applied)
            want, latents = expected[case, "fused"]
            assert levels(run(pipe, latents, "fused"), want) <= LEVELS, case
            fused = made[-1]
            assert fused.overrides is not None and fused.cache_dir.name == f"lora-{pipe.lora.key}"
            caches.add(fused.cache_dir)
            vae = pipe.graph("vae_decoder")
            assert vae.overrides is None and vae.cache_dir == ort_gpu.ort_trt_cache_dir(opened), case
        assert len(caches) == 2
    finally:
        cudart.set_runtime(previous)


@pytest.mark.parametrize("refittable", [True, False])
def test_refittable_engines_are_refitted_with_the_merged_weights(
    bundle, loras, expected, monkeypatch, refittable
):
    """trt / trt-rtx: an engine built --refittable gets the merged weights through TensorRT's Refitter (by
    the ONNX initializers' names) before any context exists; one built without is refused, which `auto`
    treats as an engine that does not suit. An engine no LoRA reaches (the VAE decoder, never built
    refittable) is neither refitted nor refused. Over the host emulation of TensorRT
    (tests/gpu_emulation.py); a real Refitter is not exercised here."""
    from edgegen.runtime import cudart
    from edgegen.runtime import pipeline as pipeline_module
    from edgegen.runtime.errors import EngineMismatchError
    from edgegen.runtime.lora import target_initializers
    from gpu_emulation import HostCuda
    from test_gpu_graphs import trt_factory

    cuda, engines = HostCuda(), {}
    previous = cudart.set_runtime(cuda)
    monkeypatch.setattr(pipeline_module, "open_graph", trt_factory(cuda, engines, refittable=refittable))
    try:
        applied = [(loras[name], scale) for name, scale in CASES["both"]]
        if not refittable:
            with pytest.raises(EngineMismatchError, match="was not built refittable"):
                DiffusionPipeline(Bundle.open(bundle), "trt-rtx", "fp32", [], lora=applied)
            return
        opened = Bundle.open(bundle)
        pipe = DiffusionPipeline(opened, "trt-rtx", "fp32", [], lora=applied)
        for call in CALLS:
            want, latents = expected["both", call]
            assert levels(run(pipe, latents, call), want) <= LEVELS, call
        assert "vae_decoder" in engines and "unet" in engines and "text_encoder" in engines
        for component, engine in engines.items():
            targeted = bool(target_initializers(opened, component, "fp32"))
            assert engine.refits == (1 if targeted else 0), component
    finally:
        cudart.set_runtime(previous)


def test_auto_reads_the_lora_files_once_for_every_backend_it_tries(bundle, loras, expected, monkeypatch):
    """`auto` reads and matches the LoRA files once, before its first candidate: a backend that refuses the
    LoRA (here an emulated TensorRT engine built without --refittable) costs no second read."""
    from edgegen.runtime import lora as lora_module
    from edgegen.runtime import pipeline as pipeline_module
    from edgegen.runtime.errors import EngineMismatchError

    real_open, real_read = pipeline_module.open_graph, lora_module.read_lora
    reads = []

    def open_graph(b, component, form, backend, cuda_graphs=None, overrides=None):
        if backend == "trt-rtx":
            raise EngineMismatchError(f"engine {component}", "was not built refittable", "emulated")
        return real_open(b, component, form, backend, overrides=overrides)

    monkeypatch.setattr(pipeline_module, "candidates", lambda backend, bundle: ["trt-rtx", "ort-cpu"])
    monkeypatch.setattr(pipeline_module, "require_backend", lambda name: None)
    monkeypatch.setattr(pipeline_module, "engine_forms", lambda bundle, name: None)
    monkeypatch.setattr(pipeline_module, "open_graph", open_graph)
    monkeypatch.setattr(lora_module, "read_lora", lambda *a: reads.append(a[0]) or real_read(*a))
    applied = [(loras[name], scale) for name, scale in CASES["both"]]
    pipe = Pipeline.from_bundle(bundle, precision="fp32", lora=applied)
    assert pipe.backend == "ort-cpu" and any("trt-rtx skipped" in n for n in pipe.notes)
    assert reads == [path for path, _ in applied]
    want, latents = expected["both", "fused"]
    assert levels(run(pipe, latents, "fused"), want) <= LEVELS


def test_cli_refuses_refittable_without_engines_or_targets(
    diffusion_checkpoint, bundle_copy, tmp_path, capsys
):
    code = main(["export", str(diffusion_checkpoint), "-o", str(tmp_path / "x"), "--refittable", "--json"])
    assert code == 2 and "pass --engines" in json.loads(capsys.readouterr().out)["error"]["note"]
    argv = ["engines", str(bundle_copy), "--flavour", "trt-rtx", "--compute-capability", "8.9"]
    assert main([*argv, "--refittable", "--json"]) == 2
    assert "no weights a LoRA may target" in json.loads(capsys.readouterr().out)["error"]["message"]


def test_weights_a_controlnet_copies_are_not_offered_for_merging(tmp_path):
    """A ControlNet made from the UNet starts as a copy of its down and mid blocks: the graphs store each
    such tensor once, for both. Merging a LoRA into it at load would change the ControlNet too, so the
    manifest offers none of them (the up blocks, which it does not copy, stay offered)."""
    from edgegen.export.testing import make_tiny_diffusion_checkpoint

    ckpt = make_tiny_diffusion_checkpoint(tmp_path / "ckpt", controlnet=True)
    out = export_checkpoint(ckpt, tmp_path / "b", progress=False, family_options={"fused_steps": [1]})
    targets = json.loads((out / "manifest.json").read_text())["lora"]["targets"]["unet"]
    attention = [m for m in targets if m.endswith("attn1.to_q")]
    copied = [m for m in attention if m.startswith(("down_blocks", "mid_block"))]
    assert copied and len(copied) < len(attention)
    for module in attention:
        assert bool(targets[module]["forms"]) == (module not in copied), module
    lora = make_random_lora(tmp_path / "l.safetensors", ckpt)
    with pytest.raises(BadInputError, match="export with --lora"):
        Pipeline.from_bundle(out, backend="ort-cpu", precision="fp32", lora=[lora])
