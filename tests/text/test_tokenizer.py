"""Tokenizer: training, round trips, special ids read from the model, yes/no single-token check."""

from __future__ import annotations

import io

import pytest
import sentencepiece as spm

from kalm_jax.text.spm import GEMMA_RESERVED, Tokenizer, TokenizerError


def _raw_spm(texts, out_path, vocab_size, user_defined, **kw):
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=buf,
        vocab_size=vocab_size,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        bos_id=2,
        unk_id=3,
        pad_piece="<pad>",
        eos_piece="<eos>",
        bos_piece="<bos>",
        unk_piece="<unk>",
        user_defined_symbols=user_defined,
        byte_fallback=True,
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        minloglevel=2,
        num_threads=2,
        **kw,
    )
    out_path.write_bytes(buf.getvalue())
    return out_path


def test_trained_layout_and_roundtrip(tokenizer, scifact_texts):
    assert (tokenizer.pad_id, tokenizer.eos_id, tokenizer.bos_id, tokenizer.unk_id) == (0, 1, 2, 3)
    assert (tokenizer.start_of_turn_id, tokenizer.end_of_turn_id) == (105, 106)
    assert tokenizer.vocab_size == 4000
    assert len(tokenizer.encode("yes")) == 1 and len(tokenizer.encode("no")) == 1
    assert tokenizer.encode("yes") == [tokenizer.yes_id] and tokenizer.encode("no") == [tokenizer.no_id]
    assert tokenizer.yes_id != tokenizer.no_id
    for text in scifact_texts[:200] + ["Ünïcödé ✓ 中文 text\n\n  two  spaces\ttab", "x" * 5]:
        ids = tokenizer.encode(text)
        assert tokenizer.unk_id not in ids
        assert tokenizer.decode(ids) == text
    # Compression on held-in real text: a useful vocabulary, not byte fallback everywhere.
    sample = " ".join(scifact_texts[:50])
    assert len(tokenizer.encode(sample)) < len(sample.encode()) / 3


def test_literal_special_tokens_map_to_single_ids(tokenizer):
    text = "<bos><start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n\n\n\n<eos><pad>"
    ids = tokenizer.encode(text)
    assert ids[:2] == [tokenizer.bos_id, tokenizer.start_of_turn_id]
    assert ids.count(tokenizer.start_of_turn_id) == 2 and ids.count(tokenizer.end_of_turn_id) == 1
    assert ids[-2:] == [tokenizer.eos_id, tokenizer.pad_id]
    assert tokenizer.decode(ids) == text
    assert tokenizer.encode_batch(["a", text]) == [tokenizer.encode("a"), ids]


def test_reload_and_fingerprint(tokenizer, tmp_path):
    again = Tokenizer.load(tokenizer.path.parent)
    assert again.special_ids == tokenizer.special_ids
    assert again.fingerprint() == tokenizer.fingerprint() and len(again.fingerprint()) == 64
    with pytest.raises(FileNotFoundError):
        Tokenizer.load(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(b"not a model")
    with pytest.raises(TokenizerError, match="tokenizer.model"):
        Tokenizer.load(tmp_path)


def test_without_gemma_layout(scifact_texts, tmp_path):
    tok = Tokenizer.train(scifact_texts[:1000], tmp_path, vocab_size=1000, gemma_layout=False)
    assert (tok.pad_id, tok.eos_id, tok.bos_id, tok.start_of_turn_id, tok.end_of_turn_id) == (0, 1, 2, 4, 5)
    assert (tmp_path / "tokenizer.model").is_file()


def test_supplied_gemma_like_tokenizer_ids_read_from_model(scifact_texts, tmp_path):
    # A Gemma-3-like layout built independently of Tokenizer.train: reserved pieces push the turn
    # markers to 105/106, and "yes"/"no" are ordinary user-defined pieces at ids we did not choose.
    user = list(GEMMA_RESERVED) + ["<start_of_turn>", "<end_of_turn>", "no", "yes"]
    path = _raw_spm(scifact_texts[:1000], tmp_path / "tokenizer.model", 1200, user)
    tok = Tokenizer.load(path)
    sp = spm.SentencePieceProcessor(model_file=str(path))
    assert tok.start_of_turn_id == 105 == sp.piece_to_id("<start_of_turn>")
    assert tok.end_of_turn_id == 106 == sp.piece_to_id("<end_of_turn>")
    assert (tok.no_id, tok.yes_id) == (107, 108)
    assert tok.path == path

    # Same pieces, different places: the ids must follow the model, not be assumed.
    shifted = _raw_spm(
        scifact_texts[:1000], tmp_path / "shifted.model", 1200, ["<end_of_turn>", "yes", "<start_of_turn>", "no"]
    )
    tok2 = Tokenizer.load(shifted)
    assert (tok2.end_of_turn_id, tok2.yes_id, tok2.start_of_turn_id, tok2.no_id) == (4, 5, 6, 7)


def test_yes_not_single_piece_is_rejected(scifact_texts, tmp_path):
    path = _raw_spm(scifact_texts[:1000], tmp_path / "tokenizer.model", 600, ["<start_of_turn>", "<end_of_turn>"])
    sp = spm.SentencePieceProcessor(model_file=str(path))
    assert len(sp.encode("yes")) > 1, "precondition: a small vocab without 'yes' as a piece"
    with pytest.raises(TokenizerError, match="'yes' must encode to exactly one token"):
        Tokenizer.load(path)


def test_missing_turn_marker_is_rejected(scifact_texts, tmp_path):
    path = _raw_spm(scifact_texts[:1000], tmp_path / "tokenizer.model", 800, ["<start_of_turn>", "yes", "no"])
    with pytest.raises(TokenizerError, match="<end_of_turn>"):
        Tokenizer.load(path)


def test_cli_trains_from_beir(data_dir, tmp_path, capsys):
    from kalm_jax.cli.tokenizer import main

    assert main([f"--config.out={tmp_path}", f"--config.beir={data_dir / 'med'}", "--config.vocab_size=1500"]) == 0
    tok = Tokenizer.load(tmp_path)
    assert tok.vocab_size == 1500 and tok.start_of_turn_id == 105
    assert "vocab 1500" in capsys.readouterr().out
