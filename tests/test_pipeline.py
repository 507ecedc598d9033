"""The runtime call: seeds, batches, explicit noise, buffers, truncation, bad input."""

import numpy as np
import pytest
from edgegen.runtime import BackendUnavailableError, BadInputError, Pipeline, TruncationWarning
from PIL import Image


@pytest.fixture(scope="module")
def pipe(bert_bundle):
    return Pipeline.from_bundle(bert_bundle, backend="ort-cpu")


def test_pil_np_and_uint8_outputs(pipe):
    images = pipe("a red apple", seed=3, num_images_per_prompt=2)
    assert len(images) == 2 and all(isinstance(i, Image.Image) and i.size == (16, 16) for i in images)
    arr = pipe("a red apple", seed=3, num_images_per_prompt=2, output_type="uint8")
    assert arr.shape == (2, 16, 16, 3) and arr.dtype == np.uint8
    assert np.array_equal(np.asarray(images[1]), arr[1])
    assert pipe.last_call.seeds == [3, 4]
    floats = pipe("a red apple", seed=3, num_images_per_prompt=2, output_type="np")  # diffusers' meaning
    assert (
        floats.dtype == np.float32
        and floats.shape == arr.shape
        and 0.0 <= floats.min() <= floats.max() <= 1.0
    )
    assert np.array_equal(np.rint(floats * 255).astype(np.uint8), arr)


@pytest.mark.parametrize(
    "keyword", ["num_images", "num_inference_steps", "latents", "negative_prompt", "seeds"]
)
def test_an_unknown_keyword_is_bad_input_naming_the_accepted_ones(pipe, keyword):
    with pytest.raises(
        BadInputError, match=f"{keyword} .*unknown keyword.*num_images_per_prompt, output_type, noise"
    ):
        pipe("a red apple", **{keyword: 1})


def test_cache_size_can_be_changed_at_any_time(bert_bundle):
    pipe = Pipeline.from_bundle(bert_bundle, backend="ort-cpu", cache_size=4)
    for p in ["a", "b", "c"]:
        pipe(p, seed=0)
    pipe.cache_size = 1  # keeps the most recently used
    assert pipe.text_cache.prompts() == ["c"]
    pipe("c", seed=0)
    assert pipe.last_call.path == "cached"
    pipe.cache_size = 0
    pipe("c", seed=0)
    assert pipe.last_call.path == "fused" and len(pipe.text_cache) == 0
    with pytest.raises(BadInputError, match="cache_size"):
        pipe.cache_size = -1


def test_seed_fixes_an_image_whatever_its_batch_position(pipe):
    alone = pipe(
        "cat",
        seed=11,
        output_type="uint8",
    )[0]
    pipe.clear_cache()
    in_batch = pipe(["dog", "cat"], seed=[10, 11], output_type="uint8")[1]
    assert np.abs(alone.astype(int) - in_batch.astype(int)).max() <= 1
    other = pipe("cat", seed=12, output_type="uint8")[0]
    assert np.abs(alone.astype(int) - other.astype(int)).max() > 1


def test_explicit_noise_equals_seeded_noise(pipe):
    noise = np.random.default_rng(5).standard_normal((1, *pipe.noise_shape), dtype=np.float32)
    a = pipe("a red apple", noise=noise, output_type="uint8")
    b = pipe("a red apple", seed=5, output_type="uint8")
    assert np.array_equal(a, b)


def test_buffers_are_reused(pipe):
    pipe("cat", seed=1, num_images_per_prompt=2)
    graph, length = pipe.graph("fused"), pipe.last_call.sequence
    before = graph.outputs(2, length)["pixels"]
    out = pipe("dog", seed=2, num_images_per_prompt=2, output_type="uint8")
    assert pipe.last_call.sequence == length and graph.outputs(2, length)["pixels"] is before
    assert not np.shares_memory(out, before), "returned images must not alias the reused buffer"


def test_short_prompts_run_at_their_length_with_the_same_images(bert_bundle):
    """ONNX Runtime on the CPU runs a call at its longest prompt's token count, not at
    max_length; padding is masked, so the images match a fixed-length run, on every path."""
    dynamic = Pipeline.from_bundle(bert_bundle, backend="ort-cpu")
    fixed = Pipeline.from_bundle(bert_bundle, backend="ort-cpu")
    fixed.tokenizer.pad_to_longest = False
    max_length = dynamic.tokenizer.max_length
    assert dynamic.graph("fused").dynamic_sequence and max_length == 16
    long = "a very small yellow star on a dark green background"
    for prompts, length in ((["cat"], 3), (["cat", long], 12), (["red apple", "a dog"], 4)):
        seeds = list(range(len(prompts)))
        got = dynamic(prompts, seed=seeds, output_type="uint8")
        assert (dynamic.last_call.path, dynamic.last_call.sequence) == ("fused", length)
        want = fixed(prompts, seed=seeds, output_type="uint8")
        assert fixed.last_call.sequence == max_length
        assert np.abs(got.astype(int) - want.astype(int)).max() <= 1
    # cached text states of different lengths share one batch, zero-padded to the longest
    cached = dynamic(["cat", long, "a dog"], seed=[0, 1, 2], output_type="uint8")
    assert (dynamic.last_call.path, dynamic.last_call.sequence) == ("cached", 12)
    want = fixed(["cat", long, "a dog"], seed=[0, 1, 2], output_type="uint8")
    assert np.abs(cached.astype(int) - want.astype(int)).max() <= 1
    split = Pipeline.from_bundle(bert_bundle, backend="ort-cpu", mode="split")
    assert np.abs(split(["cat"], seed=[0], output_type="uint8").astype(int) - want[:1].astype(int)).max() <= 1
    assert split.last_call.sequence == 3


def test_a_prompt_without_tokens_gets_the_full_length(tiny_bundles):
    """GPT-2's tokenizer gives "" no token: its all-padding row's image depends on the padding's length
    (the conditioning attends over padding alone), so that call runs at max_length, as exported."""
    dynamic = Pipeline.from_bundle(tiny_bundles["gpt2"], backend="ort-cpu")
    fixed = Pipeline.from_bundle(tiny_bundles["gpt2"], backend="ort-cpu")
    fixed.tokenizer.pad_to_longest = False
    for prompts in ([""], ["", "a red apple"]):
        got = dynamic(prompts, seed=list(range(len(prompts))), output_type="uint8")
        assert dynamic.last_call.sequence == dynamic.tokenizer.max_length
        want = fixed(prompts, seed=list(range(len(prompts))), output_type="uint8")
        assert np.abs(got.astype(int) - want.astype(int)).max() <= 1
    dynamic("a red apple", seed=0)
    assert dynamic.last_call.sequence < dynamic.tokenizer.max_length


def test_token_lengths_share_one_allocation_per_batch_size(bert_bundle):
    pipe = Pipeline.from_bundle(bert_bundle, backend="ort-cpu")
    graph = pipe.graph("fused")
    for prompt in ("cat", "a red apple", "a very small yellow star on a dark green background"):
        pipe.clear_cache()
        pipe([prompt, prompt], seed=[0, 1], output_type="uint8")
    assert sorted(graph._sets) == [(2, 3), (2, 5), (2, 12)] and list(graph._storage) == [2]
    states = [graph.outputs(2, n)["text_states"] for n in (3, 5, 12)]
    assert all(s.flags.c_contiguous and np.shares_memory(s, states[0]) for s in states)


def test_truncation_is_reported(pipe):
    long = "a very small yellow star " * 10
    with pytest.warns(TruncationWarning, match="truncated"):
        pipe(long, seed=0)
    assert pipe.last_call.truncated == [True]
    for _ in range(2):  # also when served from the embedding cache (again once its buffers exist)
        with pytest.warns(TruncationWarning):
            pipe(long, seed=0)
        assert pipe.last_call.path == "cached" and pipe.last_call.truncated == [True]


def test_lru_cache_is_bounded(bert_bundle):
    pipe = Pipeline.from_bundle(bert_bundle, backend="ort-cpu", cache_size=2)
    for p in ["a", "b", "c"]:
        pipe(p, seed=0)
    pipe("a", seed=0)
    assert pipe.last_call.path == "fused"  # evicted
    pipe("c", seed=0)
    assert pipe.last_call.path == "cached"


@pytest.mark.parametrize(
    "kwargs,fragment",
    [
        (dict(prompt=3), "expected a string"),
        (dict(prompt=[]), "non-empty list"),
        (dict(prompt=["ok", None]), "item 1"),
        (dict(prompt="x", num_images_per_prompt=0), "positive integer"),
        (dict(prompt="x", num_images_per_prompt=17), "maximum batch of 16"),
        (dict(prompt="x", seed=-1), "out of range"),
        (dict(prompt="x", seed=2**64), "out of range"),
        (dict(prompt="x", seed=1.5), "expected an integer"),
        (dict(prompt=["a", "b"], seed=[1]), "1 seeds for 2 images"),
        (dict(prompt="x", noise=np.zeros((2, 16), np.float32)), "shape"),
        (dict(prompt="x", noise=np.zeros((1, 16), np.int64)), "float"),
        (dict(prompt="x", output_type="tensor"), "output_type"),
    ],
)
def test_bad_input(pipe, kwargs, fragment):
    prompt = kwargs.pop("prompt")
    with pytest.raises(BadInputError, match=fragment) as e:
        pipe(prompt, **kwargs)
    assert "Note:" in str(e.value)


def test_unknown_backend_and_precision(bert_bundle):
    with pytest.raises(BadInputError, match="unknown backend"):
        Pipeline.from_bundle(bert_bundle, backend="metal")
    with pytest.raises(BadInputError, match="no int8 files"):
        Pipeline.from_bundle(bert_bundle, precision="int8")


def test_named_backend_that_cannot_run_is_an_error(bert_bundle):
    from edgegen.runtime.backends import backend_loads

    if backend_loads("ort-cuda")[0]:
        pytest.skip("CUDA really loads on this machine")
    with pytest.raises(BackendUnavailableError, match="ort-cuda"):
        Pipeline.from_bundle(bert_bundle, backend="ort-cuda")
    auto = Pipeline.from_bundle(bert_bundle, backend="auto")
    assert auto.backend == "ort-cpu" and any("ort-cuda skipped" in n for n in auto.notes)


def test_edgegen_threads_caps_onnx_runtime_threads(monkeypatch, bert_bundle):
    from edgegen.runtime.backends import session_options

    monkeypatch.setenv("EDGEGEN_THREADS", "1")
    assert session_options().intra_op_num_threads == 1
    pipe = Pipeline.from_bundle(bert_bundle, backend="ort-cpu", precision="fp32")
    assert pipe("a red apple", seed=1, output_type="uint8").shape[0] == 1
    monkeypatch.setenv("EDGEGEN_THREADS", "two")
    with pytest.raises(BadInputError, match="EDGEGEN_THREADS .*positive integer"):
        session_options()


def test_tokenizer_pads_to_the_longest_prompt(bert_bundle):
    from edgegen.runtime.bundle import Bundle
    from edgegen.runtime.tokenize import PromptTokenizer

    bundle = Bundle.open(bert_bundle)
    tok = PromptTokenizer.of_bundle(bundle)
    fixed = tok(["cat", "a red apple"])
    assert fixed.input_ids.shape == (2, 16) and tok.encode(["cat", "a red apple"]).lengths == [3, 5]
    tok.pad_to_longest = True
    short = tok(["cat", "a red apple"])
    assert short.input_ids.shape == (2, 5)
    assert np.array_equal(short.input_ids, fixed.input_ids[:, :5]) and np.array_equal(
        short.attention_mask.sum(1), [3, 5]
    )
    assert [tok.length_for([n]) for n in (1, 9, 16, 40)] == [1, 9, 16, 16]  # at most max_length
    assert tok.length_for([0, 5]) == 16  # an all-padding row: the exported length (see below)
    long = tok(["a very small yellow star " * 10])
    assert long.input_ids.shape == (1, 16) and long.truncated == [True]
