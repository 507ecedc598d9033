"""The GPU graphs' bookkeeping, run in CI without a GPU: TrtGraph (trt / trt-rtx) and OrtDeviceGraph
(ort-cuda / ort-trt) over a host emulation of CUDA (tests/gpu_emulation.py). They must give the ort-cpu
pipeline's pixels exactly (the emulated engine is the same ONNX on the same CPU provider), replay a captured
CUDA graph with each call's new inputs, keep the text states on the "device" between stages, and allocate
nothing per call after the first at a batch size. What this cannot show -- that real CUDA, TensorRT and the
ONNX Runtime GPU providers accept these calls -- is what the `gpu` tests (test_gpu_backends.py) are for."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
from edgegen.runtime import BackendUnavailableError, Bundle, Pipeline, backends, cudart, ort_gpu
from edgegen.runtime import pipeline as pipeline_module
from edgegen.runtime.gan import GanPipeline
from edgegen.runtime.lora import target_initializers
from edgegen.runtime.trt_graph import TrtGraph
from gpu_emulation import FAKE_TRT, FakeEngine, HostCuda

LOGGER = SimpleNamespace(errors=lambda count=3: "fake engine")
PROMPTS = ["a red apple", "a cat on a blue background", "the moon", "a rocket"]


@pytest.fixture
def host_cuda():
    cuda = HostCuda()
    previous = cudart.set_runtime(cuda)
    yield cuda
    cudart.set_runtime(previous)


@pytest.fixture(scope="module")
def bundle(bert_bundle):
    return Bundle.open(bert_bundle)


@pytest.fixture(scope="module")
def reference(bundle):
    pipes = {mode: GanPipeline(bundle, "ort-cpu", "fp32", [], mode=mode) for mode in ("fused", "split")}
    for pipe in pipes.values():
        pipe("open every graph now", seed=0)  # before any test swaps open_graph for an emulation
    return pipes


def trt_factory(cuda, engines: dict, graphs=True, refittable=False):
    """An ``open_graph`` that opens every component as an emulated TensorRT engine (kept in ``engines``),
    built ``refittable`` or not (as ``edgegen engines --refittable`` builds them: only the components with
    weights a LoRA may target)."""

    def factory(b, component, form, backend, cuda_graphs=None, overrides=None):
        spec = b.components[component]
        engine = engines[component] = FakeEngine(
            b.onnx_path(component, form), spec, cuda, b.generation["max_batch"]
        )
        entry = {
            "file": f"engines/fake/{component}.{form}.engine",
            "profile": {"max_batch": b.generation["max_batch"]},
            "refittable": refittable and bool(target_initializers(b, component, form)),
        }
        return TrtGraph(
            b,
            component,
            form,
            backend,
            spec,
            cuda_graphs=graphs,
            loaded=(engine, None, LOGGER, entry),
            trt=FAKE_TRT,
            overrides=overrides,
        )

    return factory


def emulated_trt(monkeypatch, bundle, cuda, graphs=True):
    """Pipelines built after this run every component as an emulated TensorRT engine."""
    engines = {}
    monkeypatch.setattr(pipeline_module, "open_graph", trt_factory(cuda, engines, graphs))
    return engines


def calls(pipe, ref, batch, seed, tolerance=0):
    """Same prompts and seeds through both pipelines; pixels equal (within ``tolerance`` levels)."""
    got = pipe(PROMPTS[:batch], seed=list(range(seed, seed + batch)), output_type="uint8")
    want = ref(PROMPTS[:batch], seed=list(range(seed, seed + batch)), output_type="uint8")
    assert got.shape == (batch, 16, 16, 3)
    diff = np.abs(got.astype(int) - want).max()
    assert diff <= tolerance, f"batch {batch} seed {seed}: max diff {diff}"


@pytest.mark.parametrize("mode", ["fused", "split"])
def test_trt_graph_gives_cpu_pixels_and_replays_its_cuda_graph(
    monkeypatch, host_cuda, bundle, reference, mode
):
    engines = emulated_trt(monkeypatch, bundle, host_cuda)
    pipe = GanPipeline(bundle, "trt", "fp32", [], mode=mode)
    ref = reference[mode]
    for batch in (1, 3):
        for seed in (0, 10, 20):  # new noise every call: a replay that read stale buffers would repeat images
            calls(pipe, ref, batch, seed)
    # engines have one token length: the runtime pads to max_length there, not to the prompt's length
    assert pipe.last_call.sequence == bundle.max_length and not pipe.tokenizer.pad_to_longest
    names = ["fused"] if mode == "fused" else ["text_encoder", "generator"]
    for name in names:
        graph = pipe.graph(name)
        assert graph.graphs_captured == [1, 3]
        # per batch: one plain run, two captures (engine alone; copies + engine + copies); then replays
        assert engines[name].enqueues == 6 and engines[name].executions == 6
    assert host_cuda.calls["launch"] == 4 * len(names)


def test_bench_reports_gpu_memory_on_gpu_backends(monkeypatch, host_cuda, bundle, bert_bundle):
    from edgegen.runtime.bench import format_table, run_bench

    emulated_trt(monkeypatch, bundle, host_cuda)
    pipe = GanPipeline(bundle, "trt", "fp32", [], mode="fused")
    r = run_bench(pipe, iterations=2, warmup=1)
    held = sum(len(b) for b in host_cuda.blocks.values())  # the pipeline's device buffers
    assert held > 0 and r["gpu_memory_mb"] == {"device_used": held / 2**20, "device_total": 8192.0}
    assert "GPU memory in use after the calls" in format_table(r)
    monkeypatch.undo()  # the ort-cpu pipeline below opens its real graphs, not emulated engines
    assert "gpu_memory_mb" not in run_bench(
        Pipeline.from_bundle(bert_bundle, backend="ort-cpu"), iterations=2, warmup=1
    )


def test_split_path_keeps_text_states_on_the_device(monkeypatch, host_cuda, bundle, reference):
    emulated_trt(monkeypatch, bundle, host_cuda)
    pipe = GanPipeline(bundle, "trt", "fp32", [], mode="split")
    calls(pipe, reference["split"], 2, 5)
    before = host_cuda.calls.copy()
    calls(pipe, reference["split"], 2, 6)
    delta = {k: host_cuda.calls[k] - before[k] for k in host_cuda.calls}
    # up: input_ids + attention_mask (encoder), noise + attention_mask (generator); text_states device to
    # device
    assert delta.get("copy1") == 4
    assert delta.get("copy3") == 1
    assert delta.get("copy2") == 1  # down: the generator's image only (the encoder's output is not fetched)


def test_a_fused_call_after_capture_is_one_launch_and_one_sync(monkeypatch, host_cuda, bundle, reference):
    emulated_trt(monkeypatch, bundle, host_cuda)
    pipe = GanPipeline(bundle, "trt", "fp32", [], mode="fused")
    calls(pipe, reference["fused"], 2, 0)
    before = host_cuda.calls.copy()
    calls(pipe, reference["fused"], 2, 1)
    assert {k: v - before[k] for k, v in host_cuda.calls.items() if v != before[k]} == {
        "launch": 1,
        "sync": 1,
    }


def test_no_allocation_per_call_after_the_first_at_a_batch_size(monkeypatch, host_cuda, bundle, reference):
    emulated_trt(monkeypatch, bundle, host_cuda)
    pipe = GanPipeline(bundle, "trt", "fp32", [], mode="fused")
    calls(pipe, reference["fused"], 2, 0)
    allocated = (host_cuda.calls["malloc"], host_cuda.calls["pinned"])
    for seed in range(1, 6):
        calls(pipe, reference["fused"], 2, seed)
    assert (host_cuda.calls["malloc"], host_cuda.calls["pinned"]) == allocated
    calls(pipe, reference["fused"], 4, 0)  # a new batch size allocates its own set, once
    assert host_cuda.calls["pinned"] == allocated[1] + 5  # fused: 3 inputs + 2 outputs


def test_cuda_graphs_can_be_turned_off(monkeypatch, host_cuda, bundle, reference):
    engines = emulated_trt(monkeypatch, bundle, host_cuda, graphs=False)
    pipe = GanPipeline(bundle, "trt", "fp32", [], mode="fused")
    for seed in range(3):
        calls(pipe, reference["fused"], 1, seed)
    assert pipe.graph("fused").graphs_captured == [] and host_cuda.calls["launch"] == 0
    assert engines["fused"].enqueues == 3


def test_batch_outside_the_engine_profile_is_refused(monkeypatch, host_cuda, bundle):
    emulated_trt(monkeypatch, bundle, host_cuda)
    graph = GanPipeline(bundle, "trt", "fp32", [], mode="fused").graph("fused")
    from edgegen.runtime import BadInputError

    with pytest.raises(BadInputError, match="outside the engine's profile 1..16"):
        graph.inputs(17)


# ---------------------------------------------------------------- ONNX Runtime on the (emulated) device


@pytest.fixture
def emulated_ort(monkeypatch, host_cuda, tmp_path):
    """OrtDeviceGraph with OrtValues on the CPU and CPU sessions; records the provider options asked for."""
    monkeypatch.setenv("EDGEGEN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(ort_gpu, "ORT_DEVICE", "cpu")
    real = backends.make_session
    asked = []

    def make_session(path, backend, options=None, provider_options=None):
        asked.append((path.name, backend, provider_options))
        return real(path, "ort-cpu", options)

    monkeypatch.setattr(backends, "make_session", make_session)

    def factory(b, component, form, backend, cuda_graphs=None, overrides=None):
        return ort_gpu.OrtDeviceGraph(
            b,
            component,
            form,
            backend,
            b.components[component],
            cuda_graph=component == "fused",
            overrides=overrides,
        )

    monkeypatch.setattr(pipeline_module, "open_graph", factory)
    return asked


@pytest.mark.parametrize("backend", ["ort-cuda", "ort-trt"])
def test_ort_device_graph_gives_cpu_pixels(emulated_ort, host_cuda, bundle, reference, backend):
    for mode in ("fused", "split"):
        pipe = GanPipeline(bundle, backend, "fp32", [], mode=mode)
        ref = reference[mode]
        for batch in (1, 3):
            for seed in (0, 7):
                # a fixed-batch session optimises its graph differently: a rounding flip, never more
                calls(pipe, ref, batch, seed, tolerance=1)
    # the fused graph: one fixed-batch session per batch size (the CUDA-graph path); the others: one session
    sessions = [name for name, _, _ in emulated_ort]
    assert sessions.count("fused.fp32.onnx") == 2
    assert sessions.count("text_encoder.fp32.onnx") == 1 and sessions.count("generator.fp32.onnx") == 1


def test_ort_cuda_asks_for_cuda_graphs_on_the_fused_graph_only(emulated_ort, host_cuda, bundle):
    GanPipeline(bundle, "ort-cuda", "fp32", [], mode="auto")
    GanPipeline(bundle, "ort-cuda", "fp32", [], mode="split")
    options = {name: opts for name, _, opts in emulated_ort}
    assert options["fused.fp32.onnx"]["enable_cuda_graph"] == "1"
    assert options["generator.fp32.onnx"]["enable_cuda_graph"] == "0"


def test_ort_trt_caches_live_in_the_user_cache_keyed_by_bundle_version_and_gpu(
    emulated_ort, host_cuda, bundle, tmp_path
):
    GanPipeline(bundle, "ort-trt", "fp32", [], mode="split")
    pipe = GanPipeline(bundle, "ort-trt", "fp32", [], mode="fused")
    pipe(["a", "b"], seed=[1, 2])
    options = {(name, opts.get("trt_engine_cache_path")): opts for name, _, opts in emulated_ort}
    from edgegen.runtime.engines import bundle_key

    root = tmp_path / "cache" / "ort-trt" / bundle_key(bundle)
    [version_dir] = list(root.iterdir())
    assert version_dir.name.startswith("ort-trt-") and version_dir.name.endswith("-sm89")
    fused_b2 = options[("fused.fp32.onnx", str(version_dir / "fused.fp32" / "b2"))]
    assert fused_b2["trt_cuda_graph_enable"] == "True" and fused_b2["trt_timing_cache_path"] == str(
        version_dir / "timing"
    )
    generator = options[("generator.fp32.onnx", str(version_dir / "generator.fp32" / "dynamic"))]
    assert generator["trt_profile_min_shapes"] == "noise:1x16,text_states:1x16x32,attention_mask:1x16"
    assert generator["trt_profile_max_shapes"] == "noise:16x16,text_states:16x16x32,attention_mask:16x16"
    assert generator["trt_fp16_enable"] == "False"  # fp32 file: no reduced precision
    assert not any(p.is_relative_to(bundle.root) for p in (tmp_path / "cache").rglob("*"))


def test_every_graph_satisfies_the_graph_protocol_and_gives_the_same_pixels(emulated_ort, host_cuda, bundle):
    """Each backend family's graph, driven through the Graph protocol's members alone."""
    spec = bundle.components["fused"]
    graphs = {
        "ort-cpu": backends.open_graph(bundle, "fused", "fp32", "ort-cpu"),
        "ort-cuda": ort_gpu.OrtDeviceGraph(bundle, "fused", "fp32", "ort-cuda", spec, cuda_graph=True),
        "trt": trt_factory(host_cuda, {})(bundle, "fused", "fp32", "trt"),
    }
    rng = np.random.default_rng(0)
    feeds = None
    pixels = {}
    for name, graph in graphs.items():
        assert isinstance(graph, backends.Graph), f"{type(graph).__name__} lacks a Graph member"
        inputs = graph.inputs(2)
        if feeds is None:  # one set of inputs for all three, at max_length (the GPU graphs' fixed shape)
            feeds = {
                k: rng.integers(1, 50, v.shape) if v.dtype.kind == "i" else rng.standard_normal(v.shape)
                for k, v in inputs.items()
            }
            feeds["attention_mask"][...] = 1
        for key, value in feeds.items():
            inputs[key][...] = value
        pixels[name] = graph.run(2)["pixels"].copy()
        graph.close()
    for name in ("ort-cuda", "trt"):  # a fixed-batch session may round one level differently
        assert np.abs(pixels[name].astype(int) - pixels["ort-cpu"]).max() <= 1, name


# ---------------------------------------------------------------- backend selection without a GPU


def test_open_graph_picks_the_implementation_per_backend(bundle):
    assert isinstance(backends.open_graph(bundle, "fused", "fp32", "ort-cpu"), backends.OrtGraph)
    if cudart.gpu_status()["available"]:
        pytest.skip("a GPU is present: the no-GPU errors below do not apply")
    for backend in ("ort-cuda", "trt-rtx"):
        with pytest.raises(BackendUnavailableError, match="no usable NVIDIA GPU|libcudart|not installed"):
            backends.open_graph(bundle, "fused", "fp32", backend)


def test_gpu_backends_named_without_a_gpu_are_errors(bert_bundle):
    if cudart.gpu_status()["available"]:
        pytest.skip("a GPU is present")
    for backend in ("ort-cuda", "ort-trt", "trt", "trt-rtx"):
        with pytest.raises(BackendUnavailableError, match=f"backend {backend} \\| cannot run here"):
            Pipeline.from_bundle(bert_bundle, backend=backend)


def test_auto_without_a_gpu_says_what_it_skipped(bert_bundle):
    if cudart.gpu_status()["available"]:
        pytest.skip("a GPU is present")
    pipe = Pipeline.from_bundle(bert_bundle)
    assert pipe.backend == "ort-cpu"
    assert [n.split(" skipped")[0] for n in pipe.notes] == ["trt", "trt-rtx", "ort-trt", "ort-cuda"]


def test_doctor_tells_listed_providers_from_loaded_ones(bert_bundle):
    import onnxruntime as ort
    from edgegen.runtime.doctor import run_doctor

    report = run_doctor(bert_bundle)
    assert report["providers_listed"] == ort.get_available_providers()
    assert report["providers_loaded"]["CPUExecutionProvider"] is True
    for backend in backends.ort_backends():
        provider = backends.backend_spec(backend).provider
        entry = report["backends"][backend]
        assert report["providers_loaded"][provider] == entry["loads"]
        if provider in report["providers_listed"] and not entry["loads"]:
            assert "listed but did not load" in entry["error"]
    assert set(report["backends"]) == {"ort-cpu", "ort-cuda", "ort-trt", "trt", "trt-rtx"}
    assert set(report["tensorrt"]) == {"trt", "trt-rtx"}
    assert report["gpu"]["available"] == (report["gpu"]["error"] is None)
    if not report["gpu"]["available"]:
        for backend in ("ort-cuda", "ort-trt", "trt", "trt-rtx"):
            assert report["backends"][backend]["loads"] is False and report["backends"][backend]["error"]


# ---------------------------------------- validate on trt / trt-rtx: the engines, not ONNX sessions


@pytest.fixture
def validate_on_emulated_trt(monkeypatch, host_cuda):
    """`validate --backend trt` over emulated engines: trt loads, the bundle has fp32 engines for this
    machine, and an ONNX Runtime session asked for on a TensorRT backend fails the test."""
    from edgegen.runtime import check

    engines = {}
    monkeypatch.setattr(check, "open_graph", trt_factory(host_cuda, engines))
    monkeypatch.setattr(check, "engine_forms", lambda b, backend: {"fp32"})
    monkeypatch.setattr(
        backends, "backend_loads", lambda b: (True, "") if b == "trt" else (b == "ort-cpu", "no GPU")
    )
    real = check.make_session

    def make_session(path, backend, *args, **kwargs):
        assert backends.backend_spec(backend).provider, f"an ONNX Runtime session on {backend}"
        return real(path, backend, *args, **kwargs)

    monkeypatch.setattr(check, "make_session", make_session)
    return engines


def test_validate_on_trt_runs_every_component_through_its_engine(capsys, validate_on_emulated_trt, bundle):
    from edgegen.runtime.check import check_bundle
    from edgegen.runtime.cli import main

    code = main(["validate", str(bundle.root), "--backend", "trt", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert (
        code == 0 and report["ok"] and report["backend"] == "trt" and list(report["precisions"]) == ["fp32"]
    )
    engines = validate_on_emulated_trt
    assert set(engines) == {"text_encoder", "generator", "fused"}
    assert all(e.executions == len(report["cases"]) for e in engines.values())  # every reference case, once
    # the emulated engine is the same ONNX on the same CPU: the figures of an ort-cpu validation
    want = check_bundle(bundle, "ort-cpu")["precisions"]["fp32"]
    got = report["precisions"]["fp32"]
    for name, parity in want["parity"].items():
        assert got["parity"][name]["ok"] and got["parity"][name]["max_abs"] == pytest.approx(
            parity["max_abs"], abs=1e-6
        )
    assert got["quality"]["psnr_db"] == pytest.approx(want["quality"]["psnr_db"], abs=0.01)


def test_validate_on_trt_refuses_a_precision_without_engines(validate_on_emulated_trt, monkeypatch, bundle):
    from edgegen.runtime import check

    monkeypatch.setattr(check, "engine_forms", lambda b, backend: {"fp16"})
    for precisions in (["fp32"], None):
        with pytest.raises(
            BackendUnavailableError,
            match=rf"no fp32 engines for this machine. Note: engines exist for "
            rf"fp16: validate with --precision fp16, "
            rf"build them \(edgegen engines {bundle.root} --flavour trt",
        ):
            check.check_bundle(bundle, "trt", precisions)
    assert validate_on_emulated_trt == {}  # refused before any engine was opened


def test_validate_checks_the_forms_each_backend_runs(monkeypatch):
    from edgegen.runtime import check

    fake = SimpleNamespace(precisions=["fp32", "fp16", "int8"], root="B")
    monkeypatch.setattr(check, "engine_forms", lambda b, backend: {"fp16", "int8-qdq"})
    assert check.forms_to_check(fake, "ort-cpu", None) == ["fp32", "fp16", "int8", "int8-qdq"]
    assert check.forms_to_check(fake, "trt-rtx", None) == ["fp16", "int8-qdq"]  # what has engines
    assert check.forms_to_check(fake, "trt", ["int8"]) == ["int8-qdq"]
    with pytest.raises(BackendUnavailableError, match="no fp32 engines"):
        check.forms_to_check(fake, "trt", ["fp32", "fp16"])


def test_validate_on_a_tensorrt_backend_without_a_gpu_is_a_one_line_error(capsys, bert_bundle):
    if cudart.gpu_status()["available"]:
        pytest.skip("a GPU is present")
    from edgegen.runtime.cli import main

    for backend in ("trt", "trt-rtx"):
        code = main(["validate", str(bert_bundle), "--backend", backend])
        err = capsys.readouterr().err
        assert (
            code == 1
            and err.startswith(f"edgegen: backend {backend} | cannot run here")
            and len(err.splitlines()) == 1
        )


# ---------------------------------------------------------------- the desk check's fixes (issue 24)


def test_a_capture_keeps_out_another_threads_work_on_the_shared_stream(
    monkeypatch, host_cuda, bundle, reference
):
    """Pipeline A captures while pipeline B, warmed up, is called from another thread on the process's
    stream: B's launch must not land in A's graph, nor B's synchronisation hit a capturing stream."""
    import threading

    from gpu_emulation import FakeContext

    emulated_trt(monkeypatch, bundle, host_cuda)
    other = GanPipeline(bundle, "trt", "fp32", [], mode="fused")
    calls(other, reference["fused"], 1, 0)  # captured: a later call is one launch and one sync
    errors, real = [], FakeContext.execute_async_v3

    def other_thread_call():
        try:
            calls(other, reference["fused"], 1, 3)
        except BaseException as e:  # noqa: BLE001  (reported by the assertion below)
            errors.append(e)

    def execute_async_v3(ctx, stream):
        ok = real(ctx, stream)
        if host_cuda.capturing is not None and not errors and not hasattr(host_cuda, "interleaved"):
            host_cuda.interleaved = True
            worker = threading.Thread(target=other_thread_call)
            worker.start()
            worker.join()
        return ok

    monkeypatch.setattr(FakeContext, "execute_async_v3", execute_async_v3)
    pipe = GanPipeline(bundle, "trt", "fp32", [], mode="fused")
    for seed in (0, 1, 2):
        calls(pipe, reference["fused"], 1, seed)
    assert host_cuda.interleaved and errors == []
    assert pipe.graph("fused").graphs_captured == [1]
    calls(other, reference["fused"], 1, 4)


def test_tensorrt_10_0_context_gets_its_scratch_memory_by_attribute(
    monkeypatch, host_cuda, bundle, reference
):
    """TensorRT 10.0 has no set_device_memory (10.1+): the AttributeError falls back to ``device_memory``."""
    from gpu_emulation import FakeContext

    monkeypatch.delattr(FakeContext, "set_device_memory")
    monkeypatch.setattr(
        FakeContext,
        "device_memory",
        property(lambda ctx: ctx.memory, lambda ctx, ptr: setattr(ctx, "memory", ptr)),
        raising=False,
    )
    emulated_trt(monkeypatch, bundle, host_cuda)
    pipe = GanPipeline(bundle, "trt", "fp32", [], mode="fused")
    calls(pipe, reference["fused"], 2, 0)
    assert pipe.graph("fused").graphs_captured == [2]


EP_ERROR = (
    "[ONNXRuntimeError] : 1 : FAIL : This session cannot use the CUDA Graph feature as requested by the "
    "user as all compute graph nodes have not been partitioned to the CUDA EP."
)


def onnx_runtime_refusing_capture(monkeypatch):
    """InferenceSession as onnxruntime-gpu's Python class behaves when a CUDA-graph session has a node on the
    CPU: it prints "EP Error", retries on the CPU provider alone and returns that session."""
    import onnxruntime as ort

    real = ort.InferenceSession

    class Session:
        def __init__(self, path, options=None, providers=()):
            name, opts = providers[0] if isinstance(providers[0], tuple) else (providers[0], {})
            self._session = real(path, options, providers=["CPUExecutionProvider"])
            self._providers = [name, "CPUExecutionProvider"]
            if opts.get("enable_cuda_graph") == "1":
                print("*************** EP Error ***************")
                print(f"EP Error {EP_ERROR} when using {providers}")
                print("Falling back to ['CPUExecutionProvider'] and retrying.")
                self._providers = ["CPUExecutionProvider"]

        def get_providers(self):
            return self._providers

        def __getattr__(self, name):
            return getattr(self._session, name)

    monkeypatch.setattr(ort, "InferenceSession", Session)


def test_ort_cuda_graph_refused_by_onnx_runtime_runs_without_capture(
    monkeypatch, host_cuda, bundle, reference, tmp_path, capsys
):
    monkeypatch.setenv("EDGEGEN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(ort_gpu, "ORT_DEVICE", "cpu")
    onnx_runtime_refusing_capture(monkeypatch)
    monkeypatch.setattr(
        pipeline_module,
        "open_graph",
        lambda b, component, form, backend, cuda_graphs=None, overrides=None: ort_gpu.OrtDeviceGraph(
            b, component, form, backend, b.components[component], cuda_graph=True
        ),
    )
    pipe = GanPipeline(bundle, "ort-cuda", "fp32", [], mode="fused")
    for batch in (1, 2):
        calls(pipe, reference["fused"], batch, 0, tolerance=1)
    graph = pipe.graph("fused")
    assert pipe.backend == "ort-cuda" and graph.cuda_graphs and graph.graphs_captured == []
    assert graph.notes == [
        f"fused.fp32.onnx batch {b}: no CUDA graph (ONNX Runtime refused the capture: {EP_ERROR} "
        "when using [('CUDAExecutionProvider', {'device_id': '0', 'enable_cuda_graph': '1'}), "
        "'CPUExecutionProvider']); running without one"
        for b in (1, 2)
    ]
    assert "EP Error" not in capsys.readouterr().out  # kept in the note, not printed


def test_a_provider_that_falls_back_says_why(monkeypatch, bundle):
    """make_session's error carries ONNX Runtime's own reason instead of only 'did not get'."""
    onnx_runtime_refusing_capture(monkeypatch)
    with pytest.raises(
        BackendUnavailableError,
        match="did not get CUDAExecutionProvider: ONNX Runtime fell back "
        "to the CPU after .*all compute graph nodes have not been partitioned",
    ):
        backends.make_session(
            bundle.onnx_path("fused", "fp32"),
            "ort-cuda",
            provider_options={"device_id": "0", "enable_cuda_graph": "1"},
        )
