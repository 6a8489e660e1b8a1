"""MEP pooling against a straightforward loop reference, and exact re-pooling."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from kalm_jax.model import mep


def _loop_reference(states, mask, r):
    b, n, h = states.shape
    c = -(-n // r)
    out = np.zeros((b, c, h))
    omask = np.zeros((b, c), int)
    counts = np.zeros((b, c), int)
    for i in range(b):
        for j in range(c):
            rows = [t for t in range(j * r, min(n, (j + 1) * r)) if mask[i, t]]
            counts[i, j] = len(rows)
            if rows:
                out[i, j] = states[i, rows].mean(0)
                omask[i, j] = 1
    return out, omask, counts


def _ragged(seed, b=5, n=37, h=8):
    rng = np.random.default_rng(seed)
    states = rng.normal(size=(b, n, h)).astype(np.float32)
    lengths = rng.integers(1, n + 1, b)
    lengths[0] = n
    mask = (np.arange(n)[None] < lengths[:, None]).astype(np.int32)
    return states, mask


@pytest.mark.parametrize("r", [1, 2, 3, 4, 8, 32])
def test_pool_matches_loop_reference(r):
    states, mask = _ragged(r)
    pooled, pmask, counts = mep.pool(states, mask, r)
    ref, ref_mask, ref_counts = _loop_reference(states, mask, r)
    assert pooled.shape == (5, -(-37 // r), 8)
    np.testing.assert_allclose(np.asarray(pooled), ref, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(pmask), ref_mask)
    np.testing.assert_array_equal(np.asarray(counts), ref_counts)


@pytest.mark.parametrize("r", [1, 4, 32])
def test_pool_of_bfloat16_states_sums_in_fp32(r):
    """bf16 states (the serving dtype) pool to the fp64 mean of their values, rounded once to bf16: the sums
    read the bf16 values and accumulate in fp32, with no bf16 rounding on the way."""
    states, mask = _ragged(r, n=300, h=16)
    states = jnp.asarray(states * 50 + 100, jnp.bfloat16)  # sums up to ~4e4: bf16 accumulation would be off
    pooled, pmask, counts = mep.pool(states, mask, r)
    ref, ref_mask, ref_counts = _loop_reference(np.asarray(states, np.float64), mask, r)
    assert pooled.dtype == jnp.bfloat16
    np.testing.assert_array_equal(
        np.asarray(pooled, np.float32), np.asarray(jnp.asarray(ref, jnp.float32).astype(jnp.bfloat16), np.float32)
    )
    np.testing.assert_array_equal(np.asarray(pmask), ref_mask)
    np.testing.assert_array_equal(np.asarray(counts), ref_counts)


@pytest.mark.parametrize("r,k", [(1, 2), (1, 4), (2, 2), (2, 4), (4, 8), (3, 3), (1, 32)])
def test_repool_equals_direct_pool(r, k):
    states, mask = _ragged(10 * r + k)
    pooled, _, counts = mep.pool(states, mask, r)
    coarse, cmask, ccounts = mep.repool(pooled, counts, k)
    direct, dmask, dcounts = mep.pool(states, mask, k * r)
    assert coarse.shape == direct.shape
    np.testing.assert_allclose(np.asarray(coarse), np.asarray(direct), atol=1e-5)
    np.testing.assert_array_equal(np.asarray(cmask), np.asarray(dmask))
    np.testing.assert_array_equal(np.asarray(ccounts), np.asarray(dcounts))


def test_repool_chains():
    states, mask = _ragged(3)
    p2, _, c2 = mep.pool(states, mask, 2)
    p4, _, c4 = mep.repool(p2, c2, 2)
    p16, m16, c16 = mep.repool(p4, c4, 4)
    d16, dm16, dc16 = mep.pool(states, mask, 16)
    np.testing.assert_allclose(np.asarray(p16), np.asarray(d16), atol=1e-5)
    np.testing.assert_array_equal(np.asarray(c16), np.asarray(dc16))


@pytest.mark.parametrize("bad", [0, -1, 2.5, "4x", None])
def test_bad_ratio_is_a_clear_error(bad):
    states, mask = _ragged(0)
    with pytest.raises(ValueError, match="ratio"):
        mep.pool(states, mask, bad)


def test_packed_ratios_unpack_to_one_padded_row_per_passage_and_ratio():
    states, mask = _ragged(7)
    ratios = (1, 4, 32)
    packed, pmask, layout = mep.pool_packed(states, mask, ratios)
    assert layout.lengths == (37, 10, 2) and packed.shape == (5, 49, 8) and pmask.shape == (5, 49)
    rows, row_mask = np.asarray(layout.unpack(packed)), np.asarray(layout.unpack(pmask))
    assert rows.shape == (15, 37, 8) and row_mask.shape == (15, 37)
    for p in range(5):
        for k, r in enumerate(ratios):
            ref, ref_mask, _ = _loop_reference(states[p : p + 1], mask[p : p + 1], r)
            c = ref.shape[1]
            np.testing.assert_allclose(rows[p * 3 + k, :c], ref[0], atol=1e-6)
            np.testing.assert_array_equal(row_mask[p * 3 + k, :c], ref_mask[0])
            assert not rows[p * 3 + k, c:].any() and not row_mask[p * 3 + k, c:].any()
    with pytest.raises(ValueError, match=r"packed windows must be \[passages, 49"):
        layout.unpack(packed[:, :48])


def test_decoder_refuses_packed_passages_that_do_not_fit_the_layout():
    from kalm_jax.model.build import build_model
    from kalm_jax.model.config import get_preset

    model = build_model(get_preset("tiny"), seed=0)
    h = model.config.hidden_size
    states, mask = _ragged(1, b=2, n=8, h=h)
    packed, pmask, layout = mep.pool_packed(states, mask, (1, 4))  # 8 + 2 windows per passage
    ids = np.full((4, 3), 7, np.int32)  # 2 passages x 2 ratios
    ones = np.ones((4, 3), np.int32)
    assert model.decode(ids, ones, packed, pmask, layout).shape == (4, 3, h)
    with pytest.raises(ValueError, match=r"packed passage states must be \[batch, 10, hidden\]"):
        model.decode(ids, ones, packed[:, :9], pmask[:, :9], layout)
    with pytest.raises(ValueError, match=r"decoder batch 2 and passage batch 2 x 2 differ"):
        model.decode(ids[:2], ones[:2], packed, pmask, layout)
    emptied = np.asarray(pmask).copy()
    emptied[1, 8:] = 0  # passage 1 has no window at ratio 4
    with pytest.raises(ValueError, match=r"passages \[1\] are all padding"):
        model.decode(ids, ones, packed, emptied, layout)
    # inputs embedded by the caller (the train step embeds each prompt once): the same states
    embedded = model.embed(ids)
    np.testing.assert_array_equal(
        model.decode(ids, ones, packed, pmask, layout, embedded=embedded),
        model.decode(ids, ones, packed, pmask, layout),
    )
    with pytest.raises(
        ValueError, match=rf"embedded decoder inputs have shape \(4, 2, {h}\); decoder_input_ids \(4, 3\)"
    ):
        model.decode(ids, ones, packed, pmask, layout, embedded=embedded[:, :2])
