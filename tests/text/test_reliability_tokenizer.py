"""Tokenizer ids against the model's vocabulary (max id, not only the count) and invalid Unicode texts."""

from __future__ import annotations

import json

import pytest

from kalm_jax.text.hf_json import HFTokenizer, check_vocab
from kalm_jax.text.spm import TokenizerError


def word_level(vocab: dict[str, int]) -> HFTokenizer:
    spec = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [],
        "normalizer": None,
        "pre_tokenizer": {"type": "WhitespaceSplit"},
        "post_processor": None,
        "decoder": None,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"},
    }
    return HFTokenizer(json.dumps(spec).encode())


BASE = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<start_of_turn>": 4, "<end_of_turn>": 5, "no": 6}


def test_non_contiguous_yes_id_beyond_the_model_vocab_is_an_error():
    tok = word_level({**BASE, "yes": 5000})
    assert tok.vocab_size <= 8  # the id count alone passes
    with pytest.raises(TokenizerError, match=r"'yes': 5000"):
        check_vocab(tok, 8)
    check_vocab(tok, 8192)


def test_largest_ordinary_id_beyond_the_model_vocab_is_an_error():
    tok = word_level({**BASE, "yes": 7, "cat": 900})
    with pytest.raises(TokenizerError, match="largest id 900"):
        check_vocab(tok, 16)


def test_lone_surrogate_is_a_named_error(tokenizer):
    bad = "fine text \udc80 more"
    for tok in (tokenizer, word_level({**BASE, "yes": 7})):
        with pytest.raises(TokenizerError, match="lone surrogate"):
            tok.encode(bad)
        with pytest.raises(TokenizerError, match="text 1 is not valid Unicode"):
            tok.encode_batch(["ok", bad])
