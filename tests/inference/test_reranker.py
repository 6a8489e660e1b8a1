"""The high-level Reranker against the low-level path, PyTorch transformers, and its own storage/ranking rules."""

from __future__ import annotations

import functools
import shutil
import warnings

import jax
import numpy as np
import pytest
from flax import nnx

from kalm_jax.checkpoints import orbax_io
from kalm_jax.data.beir import load_queries
from kalm_jax.inference import programs
from kalm_jax.inference.reranker import Reranker
from kalm_jax.inference.states import PassageStates
from kalm_jax.model import mep
from kalm_jax.text import prompts
from kalm_jax.text.hf_json import HFTokenizer, check_vocab
from kalm_jax.text.load import load_tokenizer
from kalm_jax.text.spm import TokenizerError

VOCAB, EOI = 4096, 4093


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tokenizer):
    """A tiny random HF checkpoint whose vocabulary fits the scifact tokenizer, with its tokenizer.model."""
    from torch_reference import build_tiny_hf

    d = tmp_path_factory.mktemp("rr_ckpt")
    torch_model = build_tiny_hf(d, vocab=VOCAB, eoi=EOI, heads=4, kv_heads=2, window=4)
    shutil.copy(tokenizer.path, d / "tokenizer.model")
    return d, torch_model


@pytest.fixture(scope="module")
def rr(ckpt):
    return Reranker.from_pretrained(ckpt[0], dtype="float32")


@pytest.fixture(scope="module")
def docs(scifact_texts):
    """Twelve real passages of varied length, cut to fit one 128-token shape bucket (few compilations)."""
    return [t[: 60 + 25 * i] for i, t in enumerate(scifact_texts[:12])]


@pytest.fixture(scope="module")
def queries(data_dir):
    return list(load_queries(data_dir / "scifact" / "queries.jsonl").values())[:3]


@functools.partial(nnx.jit, static_argnums=(5, 6, 7))
def _model_margins(model, ids, mask, dec, dmask, ratio, yes_id, no_id):
    pooled, pmask, _ = mep.pool(model.encode(ids, mask), mask, ratio)
    return model.score_margin(dec, dmask, pooled, pmask, yes_id, no_id)


def low_level_margins(model, tok, query, docs, ratio, max_document_tokens=1024, instruction=None):
    """Margins from the model API alone: prompts tokenization, encode, mep.pool, score_margin (one batch)."""
    ids, mask = prompts.tokenize_documents(tok, docs, max_document_tokens)
    dec, dmask = prompts.tokenize_decoder_prompts(tok, [query] * len(docs), instruction=instruction)
    return np.asarray(_model_margins(model, ids, mask, dec, dmask, ratio, tok.yes_id, tok.no_id))


def torch_margins(torch_model, tok, query, docs, ratio):
    from torch_reference import torch_forward

    ids, mask = prompts.tokenize_documents(tok, docs, 1024)
    dec, dmask = prompts.tokenize_decoder_prompts(tok, [query] * len(docs))
    _, logits = torch_forward(torch_model, ids, mask, dec, dmask, pool_ratio=ratio)
    last = logits[np.arange(len(docs)), dmask.sum(1) - 1]
    return last[:, tok.yes_id] - last[:, tok.no_id]


def test_score_texts_states_low_level_and_torch_agree(rr, ckpt, tokenizer, docs, queries):
    q = queries[0]
    by_text = rr.score(q, docs, return_margin=True)
    states = rr.encode_passages(docs)
    by_states = rr.score(q, states, return_margin=True)
    assert by_text.dtype == np.float32 and by_text.shape == (len(docs),)
    np.testing.assert_array_equal(by_text, by_states)
    np.testing.assert_allclose(by_text, low_level_margins(rr.model, tokenizer, q, docs, 4), atol=1e-4)
    np.testing.assert_allclose(by_text, torch_margins(ckpt[1], tokenizer, q, docs, 4), atol=1e-3)
    probs = rr.score(q, states)
    np.testing.assert_allclose(probs, 1 / (1 + np.exp(-by_text.astype(np.float64))), rtol=1e-6)
    assert ((probs > 0) & (probs < 1)).all()
    # states: input order, one window per 4 tokens of the (prefixed) document, fingerprints in meta
    lengths = [len(tokenizer.encode(prompts.document_text(d))) for d in docs]
    np.testing.assert_array_equal(states.mask.sum(1), [-(-n // 4) for n in lengths])
    np.testing.assert_array_equal(states.counts.sum(1), lengths)
    assert states.meta == rr.passage_meta and states.ratio == 4 and states.storage == "float32"


def test_instruction_changes_prompt(rr, tokenizer, docs, queries):
    q, instr = queries[1], "Given a web search query, retrieve passages that answer the query."
    got = rr.score(q, docs, instruction=instr, return_margin=True)
    np.testing.assert_allclose(got, low_level_margins(rr.model, tokenizer, q, docs, 4, instruction=instr), atol=1e-4)
    assert not np.allclose(got, rr.score(q, docs, return_margin=True), atol=1e-4)


def test_single_device_matches_data_parallel(ckpt, rr, docs, queries):
    assert len(jax.local_devices()) == 8 and rr.mesh is not None  # conftest's 8 host devices
    one = Reranker.from_pretrained(ckpt[0], dtype="float32", devices=jax.local_devices()[:1])
    assert len(one.devices) == 1 and one.mesh.devices.size == 1
    np.testing.assert_allclose(
        one.score(queries[0], docs, return_margin=True), rr.score(queries[0], docs, return_margin=True), atol=1e-5
    )


def test_rank_orders_by_score_and_honours_top_k(rr, docs, queries):
    q = queries[2]
    scores = rr.score(q, docs)
    full = rr.rank(q, docs)
    assert sorted(r["corpus_id"] for r in full) == list(range(len(docs)))
    assert [r["score"] for r in full] == sorted(scores.tolist(), reverse=True)
    margins = [r["margin"] for r in full]
    assert margins == sorted(margins, reverse=True)
    top = rr.rank(q, docs, top_k=3, return_documents=True)
    assert [r["corpus_id"] for r in top] == [r["corpus_id"] for r in full[:3]]
    for r in top:
        assert r["text"] == docs[r["corpus_id"]] and r["score"] == pytest.approx(float(scores[r["corpus_id"]]))
    states = rr.encode_passages(docs, ids=[f"d{i}" for i in range(len(docs))])
    by_states = rr.rank(q, states, top_k=5)
    assert [r["id"] for r in by_states] == [f"d{r['corpus_id']}" for r in full[:5]]
    with pytest.raises(ValueError, match="return_documents"):
        rr.rank(q, states, return_documents=True)
    with pytest.raises(ValueError, match="top_k"):
        rr.rank(q, docs, top_k=0)


def test_predict_matches_score_and_encodes_each_document_once(rr, docs, queries, monkeypatch):
    pairs = [(queries[i % 2], docs[j]) for i, j in [(0, 0), (1, 3), (0, 3), (1, 0), (0, 5), (1, 3)]]
    encoded = []
    real = rr.encode_passages

    def spy(texts, *a, **kw):
        encoded.append(list(texts))
        return real(texts, *a, **kw)

    monkeypatch.setattr(rr, "encode_passages", spy)
    got = rr.predict(pairs)
    monkeypatch.undo()
    assert encoded == [[docs[0], docs[3], docs[5]]]
    want = np.array([rr.score(q, [d])[0] for q, d in pairs])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    margins = rr.predict(pairs, return_margin=True)
    np.testing.assert_allclose(margins, [rr.score(q, [d], return_margin=True)[0] for q, d in pairs], atol=1e-5)


def test_saved_states_give_identical_scores_and_refuse_another_model(rr, docs, queries, tmp_path):
    states = rr.encode_passages(docs, ids=[str(i) for i in range(len(docs))], storage="bfloat16")
    states.save(tmp_path / "s")
    loaded = rr.load_passages(tmp_path / "s")
    assert loaded.storage == "bfloat16" and loaded.ids == states.ids
    np.testing.assert_array_equal(rr.score(queries[0], loaded), rr.score(queries[0], states))
    with pytest.raises(ValueError, match="different setting.*model"):
        PassageStates.load(tmp_path / "s", expect_meta={**rr.passage_meta, "model": "0123456789abcdef"})
    other = states.select(range(len(states)))
    other.meta["model"] = "0123456789abcdef"
    with pytest.raises(ValueError, match="encoded by another model"):
        rr.score(queries[0], other)


def test_repool_equals_encoding_at_coarser_ratio(rr, tokenizer, docs, queries):
    fine = rr.encode_passages(docs, ratio=2)
    coarse = rr.encode_passages(docs, ratio=4)
    rep = fine.repool(2)
    assert rep.ratio == 4
    np.testing.assert_array_equal(rep.mask, coarse.mask)
    np.testing.assert_array_equal(rep.counts, coarse.counts)
    np.testing.assert_allclose(rep.states, coarse.states, atol=1e-5)
    q = queries[0]
    np.testing.assert_allclose(
        rr.score(q, fine, return_margin=True), rr.score(q, coarse, return_margin=True), atol=1e-4
    )
    with pytest.raises(ValueError, match="ratio 8 cannot serve this reranker's ratio 4"):
        rr.score(q, rr.encode_passages(docs[:2], ratio=8))
    with pytest.raises(ValueError, match="ratio 3 cannot serve"):
        rr.score(q, rr.encode_passages(docs[:2], ratio=3))


def test_empty_inputs_and_empty_strings(rr, docs, queries):
    empty = rr.encode_passages([])
    assert len(empty) == 0 and empty.states.shape == (0, 0, rr.model.config.hidden_size)
    out = rr.score(queries[0], [])
    assert out.shape == (0,) and out.dtype == np.float32
    assert rr.score(queries[0], empty).shape == (0,)
    assert rr.rank(queries[0], []) == []
    assert rr.predict([]).shape == (0,)
    s = rr.score("", ["", docs[0]], return_margin=True)
    assert np.isfinite(s).all()
    # an empty document is just the "<Document>: " prefix
    np.testing.assert_allclose(s, low_level_margins(rr.model, rr.tokenizer, "", ["", docs[0]], 4), atol=1e-4)


def test_long_documents_are_truncated_with_a_warning(ckpt, tokenizer, docs, queries):
    short = Reranker.from_pretrained(ckpt[0], dtype="float32", max_document_tokens=64)
    long_doc = " ".join(docs)
    n = len(tokenizer.encode(prompts.document_text(long_doc)))
    assert n > 200
    with pytest.warns(
        UserWarning,
        match=rf"1 of 2 documents exceed max_document_tokens=64 .*truncated: "
        rf"{n - 64} tokens cut from the longest \({n} tokens\)",
    ):
        states = short.encode_passages([docs[0], long_doc])
    assert states.mask[1].sum() == 16 and states.counts[1].sum() == 64
    with warnings.catch_warnings(record=True):
        got = short.score(queries[0], [long_doc], return_margin=True)
    want = low_level_margins(short.model, tokenizer, queries[0], [long_doc], 4, max_document_tokens=64)
    np.testing.assert_allclose(got, want, atol=1e-4)
    with pytest.warns(UserWarning, match="query of .* tokens truncated to max_query_tokens=8"):
        Reranker(short.model, tokenizer, max_query_tokens=8).score(long_doc, [docs[0]])


def test_non_string_input_errors(rr, docs):
    with pytest.raises(TypeError, match=r"passages\[1\] is a int"):
        rr.score("q", [docs[0], 3])
    with pytest.raises(TypeError, match="single str; wrap it in a list"):
        rr.score("q", docs[0])
    with pytest.raises(TypeError, match="query must be a str, got list"):
        rr.score(["q"], docs)
    with pytest.raises(TypeError, match=r"texts\[0\] is a NoneType"):
        rr.encode_passages([None])
    with pytest.raises(TypeError, match=r"pairs\[1\]\[1\] \(document\) must be a str"):
        rr.predict([("q", "d"), ("q", 5)])
    with pytest.raises(TypeError, match="got one pair"):
        rr.predict(("q", "d"))
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        rr.encode_passages(docs, batch_size=0)


def test_out_of_memory_backs_off_to_three_quarters(rr, docs, monkeypatch):

    want = rr.encode_passages(docs)
    real = programs.encode_pool
    seen = []

    def small_device(graphdef, state, ids, mask, ratio):
        seen.append(ids.shape[0])
        if ids.shape[0] > 8:
            raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate")
        return real(graphdef, state, ids, mask, ratio)

    monkeypatch.setattr(programs, "encode_pool", small_device)
    with pytest.warns(RuntimeWarning) as caught:
        got = rr.encode_passages(docs, batch_size=32)
    assert [str(w.message) for w in caught] == [
        "encoding passages: out of memory with a batch of 12; retrying with batch size 9",
        "encoding passages: out of memory with a batch of 9; retrying with batch size 6",
    ]
    assert seen[:3] == [16, 16, 8]  # 12 rows (bucket 16) -> 9 (bucket 16) -> 6 (bucket 8)
    # Same states up to fp32 rounding (a batch of 8 is another compiled program than one of 16).
    np.testing.assert_allclose(got.states, want.states, rtol=1e-5, atol=2e-6)


def test_orbax_checkpoint_with_separate_tokenizer(rr, ckpt, docs, queries, tmp_path):
    orbax_io.save_model(rr.model, tmp_path / "model")
    with pytest.raises(FileNotFoundError, match="pass tokenizer=PATH"):
        Reranker.from_pretrained(tmp_path / "model", dtype="float32")
    other = Reranker.from_pretrained(tmp_path / "model", dtype="float32", tokenizer=ckpt[0] / "tokenizer.model")
    assert other.model_fingerprint == rr.model_fingerprint
    np.testing.assert_allclose(other.score(queries[0], docs[:4]), rr.score(queries[0], docs[:4]), atol=1e-6)


def test_dtype_default_float32_on_cpu_and_bfloat16(ckpt, rr, docs, queries):
    assert jax.default_backend() == "cpu" and Reranker.from_pretrained(ckpt[0]).model.dtype == np.float32
    bf = Reranker.from_pretrained(ckpt[0], dtype="bfloat16")
    states = bf.encode_passages(docs)
    assert states.storage == "bfloat16" and states.meta["compute_dtype"] == "bfloat16"
    m32 = rr.score(queries[0], docs, return_margin=True)
    m16 = bf.score(queries[0], states, return_margin=True)
    assert m16.dtype == np.float32
    np.testing.assert_allclose(m16, m32, atol=0.05 + 0.05 * np.abs(m32).max())
    with pytest.raises(ValueError, match="encoded by another model"):
        rr.score(queries[0], states)
    with pytest.raises(ValueError, match="fp16"):
        Reranker.from_pretrained(ckpt[0], dtype="float16")


# ---------------------------------------------------------------------------------------- tokenizer.json


def test_hf_tokenizer_matches_sentencepiece(tokenizer, tokenizer_json, scifact_texts, queries):
    hf = HFTokenizer.load(tokenizer_json)
    assert hf.special_ids == tokenizer.special_ids and hf.vocab_size == tokenizer.vocab_size
    texts = [prompts.decoder_text(q) for q in queries] + [prompts.document_text(t) for t in scifact_texts[:200]]
    texts.append("tabs\tand  spaces, ünïcödé ∑ 漢字 😀 <end_of_turn>\n")
    assert hf.encode_batch(texts) == tokenizer.encode_batch(texts)
    for t in texts[:5] + texts[-1:]:
        assert hf.decode(hf.encode(t)) == t
    assert hf.fingerprint() != tokenizer.fingerprint()


def test_load_tokenizer_prefers_model_then_json(tokenizer, tokenizer_json, tmp_path):
    assert isinstance(load_tokenizer(tokenizer_json.parent), HFTokenizer)
    shutil.copy(tokenizer.path, tokenizer_json.parent / "tokenizer.model")
    try:
        assert type(load_tokenizer(tokenizer_json.parent)).__name__ == "Tokenizer"
    finally:
        (tokenizer_json.parent / "tokenizer.model").unlink()
    with pytest.raises(FileNotFoundError, match="tokenizer.model or tokenizer.json"):
        load_tokenizer(tmp_path)
    with pytest.raises(TokenizerError, match="4000 ids but the model's vocabulary has only 512"):
        check_vocab(tokenizer, 512)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="not a Hugging Face tokenizers file"):
        load_tokenizer(tmp_path)


def test_reranker_on_a_hub_style_dir_with_only_tokenizer_json(ckpt, rr, tokenizer_json, docs, queries, tmp_path):
    hub = tmp_path / "hub"
    hub.mkdir()
    for f in ckpt[0].iterdir():
        if f.name != "tokenizer.model":
            (hub / f.name).symlink_to(f)
    shutil.copy(tokenizer_json, hub / "tokenizer.json")
    r = Reranker.from_pretrained(hub, dtype="float32")
    assert isinstance(r.tokenizer, HFTokenizer)
    np.testing.assert_allclose(
        r.score(queries[0], docs[:5], return_margin=True), rr.score(queries[0], docs[:5], return_margin=True), atol=1e-6
    )
