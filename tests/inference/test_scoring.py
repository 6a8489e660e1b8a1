"""The jitted entry points: encode_passages / score agree with the model methods, bucket, and handle bf16."""

from __future__ import annotations

import numpy as np
import pytest

from kalm_jax.checkpoints import hf
from kalm_jax.inference import programs, scoring
from kalm_jax.inference.engine import probability as engine_probability
from kalm_jax.model import mep


@pytest.fixture(scope="module")
def loaded(tiny_hf):
    d, _ = tiny_hf
    return hf.load(d)


def _batch(seed, b=4, s=23, t=11):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, 500, (b, s))
    mask = np.ones_like(ids)
    for i, n in enumerate(rng.integers(3, s + 1, b)):
        mask[i, n:] = 0
    ids[mask == 0] = 0
    dec = rng.integers(3, 500, (b, t))
    dmask = np.ones_like(dec)
    for i, n in enumerate(rng.integers(2, t + 1, b)):
        dmask[i, n:] = 0
    dec[dmask == 0] = 0
    return ids, mask, dec, dmask


@pytest.mark.parametrize("ratio", [1, 4, 8])
def test_entry_points_equal_model_methods(loaded, ratio):
    cfg, model = loaded
    ids, mask, dec, dmask = _batch(ratio)
    states, pmask, counts = scoring.encode_passages(model, ids, mask, ratio)
    ref_states, ref_mask, ref_counts = mep.pool(model.encode(ids, mask), mask, ratio)
    assert states.shape == ref_states.shape
    np.testing.assert_allclose(states, np.asarray(ref_states), atol=2e-5)
    np.testing.assert_array_equal(pmask, np.asarray(ref_mask))
    np.testing.assert_array_equal(counts, np.asarray(ref_counts))
    margins = scoring.score(model, dec, dmask, states, pmask, 7, 9)
    ref = np.asarray(model.score_margin(dec, dmask, ref_states, ref_mask, 7, 9))
    np.testing.assert_allclose(margins, ref, atol=2e-5)
    p = engine_probability(margins)
    assert np.all((p > 0) & (p < 1))


def test_bucketing_reuses_compiled_programs(loaded):
    _, model = loaded
    # Warm-up: batch bucket 4, length bucket 128; the scoring program also buckets the passage windows (8 for
    # the 20- and 30-token batches below, 32 for 100 and 128), so it warms both window buckets.
    for s in (128, 30):
        ids, mask, dec, dmask = _batch(0, b=4, s=s)
        states, pmask, _ = scoring.encode_passages(model, ids, mask, 4)
        scoring.score(model, dec, dmask, states, pmask, 7, 9)
    enc_before, score_before = programs.encode_pool._cache_size(), programs.score_pairs._cache_size()
    for b, s in [(3, 20), (4, 30), (3, 100)]:
        ids, mask, dec, dmask = _batch(b, b=b, s=s)
        states, pmask, _ = scoring.encode_passages(model, ids, mask, 4)
        scoring.score(model, dec, dmask, states, pmask, 7, 9)
    # All fall in batch bucket 4, length bucket 128 and a warmed window bucket: nothing recompiles.
    assert programs.encode_pool._cache_size() == enc_before
    assert programs.score_pairs._cache_size() == score_before


def test_bf16_scoring_agrees_with_fp32(tiny_hf):
    d, _ = tiny_hf
    _, m32 = hf.load(d, dtype="float32")
    _, m16 = hf.load(d, dtype="bfloat16")
    ids, mask, dec, dmask = _batch(5, b=16, s=40, t=13)
    out = {}
    for name, m in (("fp32", m32), ("bf16", m16)):
        states, pmask, _ = scoring.encode_passages(m, ids, mask, 4)
        out[name] = scoring.score(m, dec, dmask, states, pmask, 7, 9)
    rel = np.abs(out["bf16"] - out["fp32"]) / np.maximum(np.abs(out["fp32"]), 1e-3)
    big = np.abs(out["fp32"]) > 0.05
    assert np.all(np.sign(out["bf16"][big]) == np.sign(out["fp32"][big]))
    # Measured: median relative error ~1e-2 on this random tiny model (bf16 has 8 mantissa bits).
    assert np.median(rel) < 0.05, np.median(rel)
    assert out["bf16"].dtype == np.float32
