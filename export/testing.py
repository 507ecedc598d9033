"""Tiny random-weight checkpoints built in code: for tests and for checking an install (offline)."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from .generator import ConditionalGenerator, GeneratorConfig

TEXT_ENCODERS = ("bert", "clip", "t5", "gpt2")

_WORDS = ("a an the of on in with and very small large big tiny red green blue yellow orange purple pink "
          "black white gray grey brown dark light background rocket cat dog apple star moon sun tree house car "
          "flower heart face smiling happy sad centered word emoji picture photo drawing").split()


def _tokenizer(kind: str):
    """A word-level fast tokenizer with each family's special tokens and post-processing."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    specials = {
        "bert": {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]"},
        "clip": {"pad_token": "<|endoftext|>", "unk_token": "<|unk|>", "bos_token": "<|startoftext|>",
                 "eos_token": "<|endoftext|>"},
        "t5": {"pad_token": "<pad>", "unk_token": "<unk>", "eos_token": "</s>"},
        "gpt2": {"unk_token": "<|unk|>", "eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>"},
    }[kind]
    vocab = {}
    for token in list(dict.fromkeys(specials.values())) + list(_WORDS) + list(",.!?-'"):
        vocab.setdefault(token, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token=specials["unk_token"]))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    template = {"bert": ("[CLS]", "$A", "[SEP]"), "clip": ("<|startoftext|>", "$A", "<|endoftext|>"),
                "t5": ("$A", "</s>"), "gpt2": ("$A",)}[kind]
    special_ids = [(t, vocab[t]) for t in template if t != "$A"]
    tok.post_processor = processors.TemplateProcessing(single=" ".join(template), special_tokens=special_ids)
    return PreTrainedTokenizerFast(tokenizer_object=tok, **specials), len(vocab)


def _text_model(kind: str, vocab_size: int, width: int):
    import transformers as tf
    common = dict(vocab_size=vocab_size)
    if kind == "bert":
        cfg = tf.BertConfig(hidden_size=width, num_hidden_layers=2, num_attention_heads=2, intermediate_size=2 * width,
                            max_position_embeddings=64, **common)
        return tf.BertModel(cfg)
    if kind == "clip":
        cfg = tf.CLIPTextConfig(hidden_size=width, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=2 * width, max_position_embeddings=64, pad_token_id=0,
                                bos_token_id=1, eos_token_id=0, **common)
        return tf.CLIPTextModel(cfg)
    if kind == "t5":
        cfg = tf.T5Config(d_model=width, d_kv=width // 2, d_ff=2 * width, num_layers=2, num_heads=2,
                          pad_token_id=0, eos_token_id=2, decoder_start_token_id=0, **common)
        return tf.T5EncoderModel(cfg)
    cfg = tf.GPT2Config(n_embd=width, n_layer=2, n_head=2, n_positions=64, bos_token_id=1, eos_token_id=1, **common)
    return tf.GPT2Model(cfg)


def make_tiny_checkpoint(directory, text_encoder: str = "bert", seed: int = 0, image_size: int = 16) -> Path:
    """Write a gan checkpoint (text_encoder/ + generator/) with random weights; returns its path."""
    if text_encoder not in TEXT_ENCODERS:
        raise ValueError(f"text_encoder must be one of {TEXT_ENCODERS}, got {text_encoder!r}")
    import transformers
    transformers.utils.logging.disable_progress_bar()
    root = Path(directory)
    torch.manual_seed(seed)
    tokenizer, vocab_size = _tokenizer(text_encoder)
    width = 32
    model = _text_model(text_encoder, vocab_size, width).eval()
    model.save_pretrained(root / "text_encoder", safe_serialization=True)
    tokenizer.save_pretrained(root / "text_encoder")
    ups = {16: [32, 16], 32: [32, 16, 16], 64: [32, 32, 16, 16]}[image_size]
    config = GeneratorConfig(image_size=image_size, noise_dim=16, text_dim=width, cond_dim=32, channels=ups,
                             attention_resolutions=[8], attention_dim=16, max_length=16)
    generator = ConditionalGenerator(config).eval()
    with torch.no_grad():  # spread the random outputs over the whole pixel range, so parity checks bite
        generator.to_rgb[-1].weight.mul_(8.0)
    (root / "generator").mkdir(parents=True, exist_ok=True)
    config.save(root / "generator" / "config.json")
    save_file(generator.state_dict(), str(root / "generator" / "model.safetensors"))
    return root
