"""GPU backends on a real GPU: parity of ort-cuda, ort-trt, trt and trt-rtx with ort-cpu fp32, and CUDA
graph replay. Every test here skips, saying why, where there is no usable NVIDIA GPU (CI) or the backend's
libraries are missing. They are the tests that verify what tests/test_gpu_graphs.py only emulates."""

import numpy as np
import pytest
from edgegen.runtime import Pipeline, cudart
from edgegen.runtime.backends import backend_loads
from edgegen.runtime.check import pipeline_parity

GPU = cudart.gpu_status()
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not GPU["available"], reason=f"no usable NVIDIA GPU here: {GPU['error']}"),
]

PROMPTS = ["a red apple", "a cat on a blue background", "the moon", "a rocket over the sea"]
# uint8 levels against ort-cpu fp32. ONNX Runtime's CUDA kernels: a rounding flip. TensorRT may use TF32
# and its own fusions for fp32 math, so its pixels may move a little more.
TOLERANCE = {"ort-cuda": 1, "ort-trt": 2, "trt": 2, "trt-rtx": 2}
# uint8 levels between a CUDA-graph (fixed-batch) session and a dynamic-shape one: separate sessions (on
# ort-trt, separate TensorRT engines) optimise differently, so a rounding flip is allowed, as in the emulation
SEPARATE_BUILDS_TOLERANCE = 1


def need(backend):
    ok, why = backend_loads(backend)
    if not ok:
        pytest.skip(f"{backend} does not load here: {why}")


def compare(pipe, ref, tolerance, batches=(1, 3), seeds=(0, 5, 9)):
    worst = 0
    for batch in batches:
        for seed in seeds:
            args = dict(seed=list(range(seed, seed + batch)), output_type="uint8")
            got, want = pipe(PROMPTS[:batch], **args), ref(PROMPTS[:batch], **args)
            worst = max(worst, int(np.abs(got.astype(int) - want).max()))
    assert worst <= tolerance, f"{pipe.backend}: pixels differ from ort-cpu by {worst} > {tolerance}"
    return worst


@pytest.fixture(scope="module")
def cpu_pipes(bert_bundle):
    return {
        mode: Pipeline.from_bundle(bert_bundle, backend="ort-cpu", precision="fp32", mode=mode)
        for mode in ("fused", "split")
    }


@pytest.mark.parametrize("backend", ["ort-cuda", "ort-trt"])
@pytest.mark.parametrize("mode", ["fused", "split"])
def test_ort_gpu_backend_matches_ort_cpu(bert_bundle, cpu_pipes, backend, mode, tmp_path, monkeypatch):
    need(backend)
    monkeypatch.setenv("EDGEGEN_CACHE", str(tmp_path))
    pipe = Pipeline.from_bundle(bert_bundle, backend=backend, precision="fp32", mode=mode)
    assert pipe.backend == backend
    compare(pipe, cpu_pipes[mode], TOLERANCE[backend])
    assert pipeline_parity(pipe) <= TOLERANCE[backend] + 1  # against PyTorch's pixels


@pytest.mark.parametrize("backend", ["ort-cuda", "ort-trt"])
def test_ort_cuda_graph_replay_matches_runs_without_graphs(
    bert_bundle, cpu_pipes, backend, tmp_path, monkeypatch
):
    need(backend)
    monkeypatch.setenv("EDGEGEN_CACHE", str(tmp_path))
    graphs = Pipeline.from_bundle(bert_bundle, backend=backend, precision="fp32", mode="fused")
    monkeypatch.setenv("EDGEGEN_CUDA_GRAPHS", "0")
    plain = Pipeline.from_bundle(bert_bundle, backend=backend, precision="fp32", mode="fused")
    assert graphs.graph("fused").cuda_graphs and not plain.graph("fused").cuda_graphs
    for _ in range(2):  # the second round is served by replays
        compare(graphs, cpu_pipes["fused"], TOLERANCE[backend])
        compare(graphs, plain, SEPARATE_BUILDS_TOLERANCE)


# ---------------------------------------------------------------- native TensorRT: engines built on this GPU


@pytest.fixture(scope="module", params=["trt", "trt-rtx"])
def engine_bundle(request, tiny_checkpoints, tmp_path_factory):
    flavour = request.param
    ok, why = backend_loads(flavour)
    if not ok:
        pytest.skip(f"{flavour} does not load here: {why}")
    from edgegen.export import export_checkpoint

    mp = pytest.MonkeyPatch()
    mp.setenv("EDGEGEN_CACHE", str(tmp_path_factory.mktemp("cache")))
    try:
        # fp32 only: its engines are built from the fp32 files, so parity is against the same numbers
        path = export_checkpoint(
            tiny_checkpoints["bert"], tmp_path_factory.mktemp(flavour) / "b", engines=flavour, progress=False
        )
        yield flavour, path
    finally:
        mp.undo()


@pytest.mark.tensorrt
@pytest.mark.parametrize("mode", ["fused", "split"])
def test_tensorrt_engines_match_ort_cpu(engine_bundle, cpu_pipes, mode):
    flavour, path = engine_bundle
    pipe = Pipeline.from_bundle(path, backend=flavour, precision="fp32", mode=mode)
    compare(pipe, cpu_pipes[mode], TOLERANCE[flavour])
    assert pipeline_parity(pipe) <= TOLERANCE[flavour] + 1


@pytest.mark.tensorrt
def test_tensorrt_cuda_graph_replay_is_bitwise_the_plain_run(engine_bundle, monkeypatch):
    flavour, path = engine_bundle
    graphs = Pipeline.from_bundle(path, backend=flavour, precision="fp32", mode="fused")
    monkeypatch.setenv("EDGEGEN_CUDA_GRAPHS", "0")
    plain = Pipeline.from_bundle(path, backend=flavour, precision="fp32", mode="fused")
    for _ in range(2):
        compare(graphs, plain, 0)
    graph = graphs.graph("fused")
    assert graph.graphs_captured == [1, 3], graph.notes
    assert plain.graph("fused").graphs_captured == []


@pytest.mark.tensorrt
def test_auto_chooses_the_engines_built_here(engine_bundle):
    flavour, path = engine_bundle
    pipe = Pipeline.from_bundle(path)
    order = ["trt", "trt-rtx"]
    assert pipe.backend in order[: order.index(flavour) + 1], pipe.notes
