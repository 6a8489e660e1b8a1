"""The one engine runs quantized weights: it quantizes a copy (the caller's model is untouched), scores as the
float engine does on the dequantized weights, keys its caches apart, and splits quantized weights over a
tensor axis like float ones."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kalm_jax.checkpoints import loader
from kalm_jax.inference.engine import InferenceEngine
from kalm_jax.inference.reranker import Reranker
from kalm_jax.model import quantization
from kalm_jax.parallel.inference_policy import WEIGHTS_ENV


@pytest.fixture(scope="module")
def loaded(hub_checkpoint):
    return loader.load(hub_checkpoint[0], dtype="float32")


@pytest.fixture(scope="module")
def docs(scifact_texts):
    return [t[: 60 + 37 * i] for i, t in enumerate(scifact_texts[200:212])]


QUERY = "does vitamin d supplementation reduce fractures"


def _scores(rr, docs):
    return np.asarray(rr.score(QUERY, docs, return_margin=True))


def test_engine_quantizes_a_copy_and_matches_the_dequantized_float_engine(loaded, docs):
    model, tok = loaded.model, loaded.tokenizer
    rr = Reranker(model, tok, quantization="int8", show_progress=False)
    assert quantization.mode_of(model) == "none"  # the caller's model is not changed
    assert rr.engine.quantization == "int8" and quantization.mode_of(rr.engine.model) == "int8"
    reference = Reranker(quantization.dequantize_model(rr.engine.model), tok, show_progress=False)
    np.testing.assert_allclose(_scores(rr, docs), _scores(reference, docs), rtol=1e-5, atol=1e-5)
    assert rr.passage_meta["quantization"] == "int8" and reference.passage_meta["quantization"] == "none"
    assert rr.engine.model_fingerprint != reference.engine.model_fingerprint  # caches of one never serve the other
    dynamic = Reranker(model, tok, quantization="int8-dynamic", show_progress=False)
    assert dynamic.engine.model_fingerprint not in (rr.engine.model_fingerprint, reference.engine.model_fingerprint)


def test_quantized_scores_rank_like_float(loaded, docs):
    model, tok = loaded.model, loaded.tokenizer
    ref = _scores(Reranker(model, tok, show_progress=False), docs)
    spread = ref.max() - ref.min()
    for mode, bound in (("int8", 0.03), ("int8-dynamic", 0.06), ("fp8", 0.1)):
        got = _scores(Reranker(model, tok, quantization=mode, show_progress=False), docs)
        assert np.abs(got - ref).max() / spread < bound, mode
        assert np.corrcoef(got, ref)[0, 1] > 0.99, mode


def test_quantized_weights_split_over_a_tensor_axis(loaded, docs, monkeypatch):
    model, tok = loaded.model, loaded.tokenizer
    devices = jax.local_devices()[:2]
    replicated = Reranker(model, tok, quantization="int8", devices=devices, show_progress=False)
    monkeypatch.setenv(WEIGHTS_ENV, "tensor:2")
    split = Reranker(model, tok, quantization="int8", devices=devices, show_progress=False)
    assert split.engine.policy.mode == "tensor" and split.engine.policy.tensor == 2
    q = split.engine.model.decoder.q.get_value()  # [L, H, N, D]: heads split, scales [L, 1, N, D] too
    assert q.qvalue.sharding.spec[2] == "tensor" and q.scale.sharding.spec[2] == "tensor"
    assert q.qvalue.dtype == jnp.int8
    np.testing.assert_allclose(_scores(split, docs), _scores(replicated, docs), rtol=1e-5, atol=1e-5)


def test_engine_refuses_an_unknown_mode(loaded):
    with pytest.raises(ValueError, match="expected one of none, int8, int8-dynamic, fp8"):
        InferenceEngine(loaded.model, loaded.tokenizer, quantization="int4")
