"""Parity of the NNX model with the PyTorch `transformers` T5Gemma 2 implementation (fp32, CPU)."""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest
from flax import nnx
from torch_reference import build_tiny_hf, official_pool, torch_forward

from kalm_jax.checkpoints import hf
from kalm_jax.model import mep

TOL = 1e-4
CASES = {
    # GQA, sliding window 4, sequences longer than the window on both sides, linear global RoPE x8.
    "gqa": dict(heads=4, kv_heads=2, window=4),
    # MHA, odd window, three layers, linear RoPE on both layer types.
    "mha": dict(
        heads=2,
        kv_heads=2,
        window=5,
        local_factor=2.0,
        global_factor=4.0,
        layers=("sliding_attention", "full_attention", "sliding_attention"),
    ),
    # A layer pattern of period 3 over 7 layers: two whole periods in the layer scan + one layer after it.
    "period3": dict(
        heads=2,
        kv_heads=1,
        window=3,
        layers=("sliding_attention", "sliding_attention", "full_attention") * 2 + ("sliding_attention",),
    ),
    # Multi-query with final logit soft-capping.
    "mqa_softcap": dict(heads=2, kv_heads=1, window=6, softcap=30.0),
}


def _inputs(seed: int, vocab: int = 500, eoi: int = 501):
    rng = np.random.default_rng(seed)
    enc_ids = rng.integers(3, vocab, (3, 19))
    enc_mask = np.ones_like(enc_ids)
    enc_mask[1, 12:] = 0
    enc_mask[2, 5:] = 0
    enc_ids[enc_mask == 0] = 0
    enc_ids[0, 4] = eoi
    dec_ids = rng.integers(3, vocab, (3, 13))
    dec_ids[:, 0] = 2
    dec_mask = np.ones_like(dec_ids)
    dec_mask[0, 9:] = 0
    dec_mask[2, 11:] = 0
    dec_ids[dec_mask == 0] = 0
    dec_ids[1, 3] = eoi
    return enc_ids, enc_mask, dec_ids, dec_mask


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    torch_model = build_tiny_hf(d, seed=len(request.param), **CASES[request.param])
    cfg, model = hf.load(d)
    return torch_model, cfg, model


# The model's methods, each compiled as one program (run eagerly, every operation compiles on its own). One
# program per method, so score_margin and decoder_logits stay two separate computations.
@nnx.jit
def _encode(model, ids, mask):
    return model.encode(ids, mask)


@nnx.jit
def _decoder_logits(model, dec_ids, dec_mask, states, mask):
    return model.decoder_logits(dec_ids, dec_mask, states, mask)


@functools.partial(nnx.jit, static_argnums=(5, 6))
def _score_margin(model, dec_ids, dec_mask, states, mask, yes_id, no_id):
    return model.score_margin(dec_ids, dec_mask, states, mask, yes_id, no_id)


@functools.partial(jax.jit, static_argnums=2)
def _pool(states, mask, ratio):
    return mep.pool(states, mask, ratio)


def test_encoder_and_decoder_logits_match(case):
    torch_model, cfg, model = case
    enc_ids, enc_mask, dec_ids, dec_mask = _inputs(1)
    ref_states, ref_logits = torch_forward(torch_model, enc_ids, enc_mask, dec_ids, dec_mask)
    states = np.asarray(_encode(model, enc_ids, enc_mask))
    logits = np.asarray(_decoder_logits(model, dec_ids, dec_mask, states, enc_mask))
    valid_e = enc_mask.astype(bool)
    valid_d = dec_mask.astype(bool)
    assert states.shape == ref_states.shape and logits.shape == ref_logits.shape
    assert np.abs(states - ref_states)[valid_e].max() <= TOL
    assert np.abs(logits - ref_logits)[valid_d].max() <= TOL
    # The comparison is meaningful: logits vary across positions and the eoi token changed its row.
    assert np.abs(ref_logits).max() > 0.1


@pytest.mark.parametrize("ratio", [1, 2, 3, 4, 8])
def test_margins_on_pooled_passages_match(case, ratio):
    torch_model, cfg, model = case
    enc_ids, enc_mask, dec_ids, dec_mask = _inputs(2)
    _, ref_logits = torch_forward(torch_model, enc_ids, enc_mask, dec_ids, dec_mask, pool_ratio=ratio)
    last = dec_mask.sum(1) - 1
    yes_id, no_id = 17, 42
    ref_margin = ref_logits[np.arange(3), last, yes_id] - ref_logits[np.arange(3), last, no_id]

    states = _encode(model, enc_ids, enc_mask)
    pooled, pmask, counts = _pool(states, enc_mask, ratio)
    ref_pooled, ref_pmask = official_pool(np.asarray(states, np.float64), enc_mask, ratio)
    np.testing.assert_allclose(np.asarray(pooled), ref_pooled, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(pmask), ref_pmask)
    margins = np.asarray(_score_margin(model, dec_ids, dec_mask, pooled, pmask, yes_id, no_id))
    assert margins.dtype == np.float32
    np.testing.assert_allclose(margins, ref_margin, atol=TOL, rtol=0)
    full = np.asarray(_decoder_logits(model, dec_ids, dec_mask, pooled, pmask))
    np.testing.assert_allclose(margins, full[np.arange(3), last, yes_id] - full[np.arange(3), last, no_id], atol=1e-5)
