"""The Pallas splash-attention path (kalm_jax/model/attention/splash.py), run in Pallas interpret mode on CPU, against
the einsum attention (`xla.xla_attention`): forward and gradients on the real query rows, for every mask
structure the model builds, with GQA, lengths that are not multiples of 128, and no NaN anywhere."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

from kalm_jax.model.attention import dispatch, masks, splash, xla


def interpreted(q, k, v, mask, scale):
    """The splash kernel in Pallas interpret mode (runs on CPU)."""
    return splash.flash_attention(q, k, v, mask, scale, interpret=True)


def _padding(b: int, length: int, real: list[int]) -> jax.Array:
    """Right padding [B, length] int32: row i has real[i] real tokens."""
    return jnp.asarray(np.arange(length)[None, :] < np.asarray(real)[:, None], jnp.int32)


def _case(name: str):
    """(q [B, T, N, D], k, v [B, S, K, D], Mask, real query rows [B, T] bool) of a named mask structure."""
    rng = np.random.default_rng(0)
    b, d = 2, 32
    if name == "full_padding":  # every key, key padding; G = 2, T = S = 140 (heads folded: 280 rows)
        t, s, n, kh = 140, 140, 4, 2
        keys = _padding(b, s, [140, 97])
        mask = masks.Mask(keys, None, queries=keys)
    elif name == "window":  # the encoder's bidirectional window, unfolded (LocalMask), G = 2
        t, s, n, kh = 128, 128, 4, 2
        keys = _padding(b, s, [128, 75])
        mask = masks.Mask(keys, masks.encoder_window(t, 16), queries=keys)
    elif name == "window_short":  # window on 20 tokens padded to 128, G = 1 (LocalMask)
        t, s, n, kh = 20, 20, 2, 2
        keys = _padding(b, s, [20, 13])
        mask = masks.Mask(keys, masks.encoder_window(t, 6), queries=keys)
    elif name == "causal":  # causal self-attention, 130 queries padded to 256 (CausalMask)
        t, s, n, kh = 130, 130, 2, 2
        keys = _padding(b, s, [130, 71])
        mask = masks.Mask(keys, masks.causal_window(t), queries=keys)
    elif name == "no_padding_key":  # padding queries but no padding key anywhere (128 = no padded keys):
        t, s, n, kh = 128, 128, 2, 1  # those rows are fully masked by the segment ids and must stay finite
        keys = jnp.ones((b, s), jnp.int32)
        mask = masks.Mask(keys, masks.causal_window(t), queries=_padding(b, t, [128, 100]))
    elif name == "merged_sliding":  # decoder: sliding-causal self keys ++ passage keys, G = 4 (folded)
        t, sp, n, kh = 24, 150, 4, 1
        dec, enc = _padding(b, t, [24, 17]), _padding(b, sp, [150, 61])
        mask = masks.concat_masks(masks.Mask(dec, masks.causal_window(t, 8), queries=dec), masks.Mask(enc), t, t, sp)
        s, keys = t + sp, dec
    else:
        raise KeyError(name)
    q = jnp.asarray(rng.normal(size=(b, t, n, d)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(b, s, kh, d)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(b, s, kh, d)), jnp.float32)
    real = np.asarray(mask.queries if mask.queries is not None else np.ones((b, t)), bool)
    return q, k, v, mask, real


@pytest.mark.parametrize(
    "name", ["full_padding", "window", "window_short", "causal", "no_padding_key", "merged_sliding"]
)
def test_splash_matches_xla(name):
    q, k, v, mask, real = _case(name)
    weight = jnp.asarray(real, jnp.float32)[:, :, None, None]  # the loss reads the real rows only

    def loss(fn, m):
        return lambda q, k, v: (weight * fn(q, k, v, m, 0.2) ** 2).sum()

    def output_and_grads(fn, m):
        """One jitted program per implementation: its output and the gradients of `loss` (op-by-op
        dispatch of the interpreted kernel and of the einsum gradients costs ~5x more on CPU)."""
        return jax.jit(lambda q, k, v: (fn(q, k, v, m, 0.2), jax.grad(loss(fn, m), argnums=(0, 1, 2))(q, k, v)))

    out, grads = output_and_grads(interpreted, mask)(q, k, v)
    ref, ref_grads = output_and_grads(xla.xla_attention, mask.dense())(q, k, v)
    assert np.isfinite(np.asarray(out)).all()  # padding rows included
    np.testing.assert_allclose(np.asarray(out)[real], np.asarray(ref)[real], atol=2e-6)
    for got, want, what in zip(grads, ref_grads, "qkv"):
        assert np.isfinite(np.asarray(got)).all(), what
        np.testing.assert_allclose(got, want, atol=2e-5, err_msg=f"d{what}")


def test_static_mask_structure():
    """The library's computable masks where the pattern is a band on unfolded queries (block sparsity
    without a stored mask), a NumpyMask otherwise; padded rows always see a key."""
    assert isinstance(splash.static_mask(None, 256, 384), sm.FullMask)
    local = splash.static_mask(masks.encoder_window(200, 16), 256, 256)
    assert isinstance(local, sm.LocalMask) and local.window_size == (7, 8)
    assert isinstance(splash.static_mask(masks.causal_window(200), 256, 256), sm.CausalMask)
    sliding = splash.static_mask(masks.causal_window(200, 64), 256, 256)
    assert isinstance(sliding, sm.LocalMask) and sliding.window_size == (63, 0)
    merged = masks.concat_masks(
        masks.Mask(jnp.ones((1, 64)), masks.causal_window(64)), masks.Mask(jnp.ones((1, 100))), 64, 64, 100
    )
    folded = splash.static_mask(merged.pattern, 256, 256, fold=4)
    assert isinstance(folded, sm.NumpyMask)
    np.testing.assert_array_equal(folded.array[64:128, :164], merged.pattern)  # second folded head
    assert not folded.array[:, 164:].any()  # padded keys hidden from every row
    assert folded.array.any(axis=1).all()
    assert splash.fold_heads(64, 4) and splash.fold_heads(64, 2)
    assert not splash.fold_heads(512, 4) and not splash.fold_heads(64, 1)


def test_splash_refuses_a_pattern_row_without_keys():
    pattern = masks.causal_window(8)
    pattern[3] = False
    q = jnp.zeros((1, 8, 1, 8))
    with pytest.raises(ValueError, match=r"Mask.pattern rows \[3\] see no key"):
        splash.flash_attention(q, q, q, masks.Mask(jnp.ones((1, 8)), pattern), 1.0)


def test_dense_mask_takes_the_einsum_path():
    """A dense boolean mask (the scoring layer's single query row) is computed by the einsum attention."""
    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.normal(size=(2, 1, 4, 16)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(2, 30, 2, 16)), jnp.float32)
    mask = jnp.asarray(rng.random((2, 1, 30)) > 0.3)
    np.testing.assert_array_equal(splash.flash_attention(q, k, k, mask, 0.3), xla.xla_attention(q, k, k, mask, 0.3))
    text = jax.jit(lambda q, k: splash.flash_attention(q, k, k, mask, 0.3)).lower(q, k).as_text()
    assert "tpu_custom_call" not in text and "pallas" not in text


def test_platform_dispatch_on_cpu_is_the_einsum_path():
    """On CPU `dispatch.attention` with impl "auto" gives the "xla" result bit for bit, and that is the dense
    einsum result (to fp32 rounding: a window pattern may take the block-wise path, `dispatch.banded_attention`)."""
    q, k, v, mask, _ = _case("window_short")
    # Each call is one jitted program (op-by-op dispatch of the block-wise path costs more on CPU).
    want = jax.jit(lambda q, k, v: dispatch.attention(q, k, v, mask, 0.2))(q, k, v)
    auto = jax.jit(lambda q, k, v: dispatch.attention(q, k, v, mask, 0.2, impl="auto"))(q, k, v)
    np.testing.assert_array_equal(auto, want)
    dense = jnp.broadcast_to(mask.dense(), (q.shape[0], q.shape[1], k.shape[1]))
    seen = np.asarray(dense).any(-1)  # rows that see a key (a fully masked row averages other values)
    ref = jax.jit(lambda q, k, v: xla.xla_attention(q, k, v, dense, 0.2))(q, k, v)
    np.testing.assert_allclose(np.asarray(want)[seen], np.asarray(ref)[seen], atol=2e-6, rtol=0)
