"""The jitted entry points: encode_passages / score agree with the model methods, bucket, and handle bf16."""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest
from flax import nnx

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


# The references are the model's own methods, each compiled as one program (run eagerly, every operation compiles
# on its own). The encoder is a program of its own: the three cases share its shapes, so it compiles once. Plain
# jax.jit over nnx.split's (graphdef, state), as the engine's programs take them.
@functools.partial(jax.jit, static_argnums=0)
def _ref_encode(graphdef, state, ids, mask):
    return nnx.merge(graphdef, state).encode(ids, mask)


@functools.partial(jax.jit, static_argnums=2)
def _ref_pool(states, mask, ratio):
    return mep.pool(states, mask, ratio)


@functools.partial(jax.jit, static_argnums=(0, 6, 7))
def _ref_margin(graphdef, state, dec, dmask, states, smask, yes_id, no_id):
    return nnx.merge(graphdef, state).score_margin(dec, dmask, states, smask, yes_id, no_id)


@pytest.mark.parametrize("ratio", [1, 4, 8])
def test_entry_points_equal_model_methods(loaded, ratio):
    cfg, model = loaded
    ids, mask, dec, dmask = _batch(ratio)
    states, pmask, counts = scoring.encode_passages(model, ids, mask, ratio)
    ref_states, ref_mask, ref_counts = _ref_pool(_ref_encode(*nnx.split(model), ids, mask), mask, ratio)
    assert states.shape == ref_states.shape
    np.testing.assert_allclose(states, np.asarray(ref_states), atol=2e-5)
    np.testing.assert_array_equal(pmask, np.asarray(ref_mask))
    np.testing.assert_array_equal(counts, np.asarray(ref_counts))
    margins = scoring.score(model, dec, dmask, states, pmask, 7, 9)
    ref = np.asarray(_ref_margin(*nnx.split(model), dec, dmask, ref_states, ref_mask, 7, 9))
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


def _count_placements(monkeypatch) -> list[int]:
    """Patches jax.device_put to record the bytes of every call's array leaves (one entry per call)."""
    import jax

    placed: list[int] = []
    real = jax.device_put

    def counting(x, *args, **kwargs):
        placed.append(sum(int(np.asarray(a).nbytes) for a in jax.tree.leaves(x)))
        return real(x, *args, **kwargs)

    monkeypatch.setattr(jax, "device_put", counting)
    return placed


def _weight_bytes(model) -> int:
    import jax
    from flax import nnx

    return sum(int(x.nbytes) for x in jax.tree.leaves(nnx.state(model)))


def test_array_level_functions_place_the_weights_once(tiny_hf, monkeypatch):
    """encode_passages / score reuse one engine per model: the second and later calls place no weights (only
    their token and state arrays) and give results identical to the first call's."""
    _, model = hf.load(tiny_hf[0])
    scoring.clear_array_engines()
    placed = _count_placements(monkeypatch)
    weights = _weight_bytes(model)
    ids, mask, dec, dmask = _batch(11)
    first = scoring.encode_passages(model, ids, mask, 4)
    assert sum(placed) >= weights  # the first call places the weights
    placed.clear()
    second = scoring.encode_passages(model, ids, mask, 4)
    assert 0 < sum(placed) < weights, placed  # only the token arrays
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)
    placed.clear()
    m1 = scoring.score(model, dec, dmask, first[0], first[1], 7, 9)
    m2 = scoring.score(model, dec, dmask, first[0], first[1], 7, 9)
    other = scoring.score(model, dec, dmask, first[0], first[1], 9, 7)  # other yes/no ids: the same engine
    assert 0 < sum(placed) < weights, placed
    np.testing.assert_array_equal(m1, m2)
    np.testing.assert_array_equal(other, -m1)
    ref = np.asarray(_ref_margin(*nnx.split(model), dec, dmask, first[0], first[1], 7, 9))
    np.testing.assert_allclose(m1, ref, atol=2e-5)


def test_array_engine_follows_weight_changes(tiny_hf):
    """New weights (new arrays in the model) give a new engine: results follow the model, never stale."""
    import jax
    from flax import nnx

    _, model = hf.load(tiny_hf[0])
    ids, mask, dec, dmask = _batch(12)
    before = scoring.encode_passages(model, ids, mask, 4)[0]
    engine = scoring.array_engine(model)
    assert scoring.array_engine(model) is engine
    state = nnx.state(model)
    nnx.update(model, jax.tree.map(lambda x: x * 1.5, state))
    assert scoring.array_engine(model) is not engine
    after, pmask, _ = scoring.encode_passages(model, ids, mask, 4)
    ref = np.asarray(_ref_pool(_ref_encode(*nnx.split(model), ids, mask), mask, 4)[0])
    np.testing.assert_allclose(after, ref, atol=2e-5)
    assert np.abs(after - before).max() > 1e-3
    margins = scoring.score(model, dec, dmask, after, pmask, 7, 9)
    np.testing.assert_allclose(
        margins, np.asarray(_ref_margin(*nnx.split(model), dec, dmask, after, pmask, 7, 9)), atol=2e-5
    )
    # another model object with the same weights has its own entry; the cache keeps ARRAY_ENGINES of them
    _, other = hf.load(tiny_hf[0])
    assert scoring.array_engine(other) is not scoring.array_engine(model)
    scoring.clear_array_engines()
    assert scoring.array_engine(model) is not engine
