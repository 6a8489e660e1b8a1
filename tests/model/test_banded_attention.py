"""Block-wise attention under band (sliding-window) masks agrees with the dense einsum attention."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kalm_jax.model.attention import banded, dispatch, masks, xla
from kalm_jax.model.build import build_model
from kalm_jax.model.config import get_preset


def test_band_limits_of_the_model_patterns():
    # Encoder window W: key j visible from query i when -((W+1)//2 - 1) <= j - i <= W//2.
    assert banded.band_limits(masks.encoder_window(40, 16)) == (-7, 8)
    assert banded.band_limits(masks.encoder_window(9, 4)) == (-1, 2)
    assert banded.band_limits(masks.encoder_window(1100, 512)) == (-255, 256)
    assert banded.band_limits(masks.encoder_window(50, 12)[:37]) == (-5, 6)  # rectangular [T, S]
    assert banded.band_limits(masks.encoder_window(50, 12)[20:]) == (15, 26)  # rows from query 20 on
    assert banded.band_limits(masks.causal_window(30, 5)) == (-4, 0)
    assert banded.band_limits(masks.causal_window(30)) == (-29, 0)
    # Not bands: a hole inside the band, causal keys followed by always-visible passage keys, nothing.
    holed = masks.encoder_window(20, 6).copy()
    holed[5, 6] = False
    assert banded.band_limits(holed) is None
    shortened = masks.encoder_window(20, 6).copy()
    shortened[10, 13] = False  # a shorter run in one row
    assert banded.band_limits(shortened) is None
    assert banded.band_limits(np.eye(6, dtype=bool)[::-1].copy()) is None  # an anti-diagonal
    merged = np.concatenate([masks.causal_window(8), np.ones((8, 5), bool)], axis=1)
    assert banded.band_limits(merged) is None
    assert banded.band_limits(None) is None
    assert banded.band_limits(np.zeros((4, 4), bool)) is None


def test_blocking_choice():
    def blocking(t, s, pattern):
        return banded.band_blocking(masks.Mask(jnp.ones((1, s), bool), pattern), t, s)

    # nano / small (W = 512): blocks of 128 queries see 640 keys, so only passages longer than 640 block.
    assert blocking(1024, 1024, masks.encoder_window(1024, 512)) == banded.BandBlocking(-255, 256, 128, 640)
    assert blocking(640, 640, masks.encoder_window(640, 512)) is None
    # large (W = 1024): 1152 keys per block of 128.
    assert blocking(1536, 1536, masks.encoder_window(1536, 1024)).span == 1152
    # tiny (W = 16): blocks of 4 queries see 20 keys (1.25 W).
    assert blocking(64, 64, masks.encoder_window(64, 16)) == banded.BandBlocking(-7, 8, 4, 20)
    assert blocking(8, 8, masks.causal_window(8)) is None  # the span covers every key
    assert banded.band_blocking(masks.Mask(jnp.ones((1, 64), bool)), 64, 64) is None  # no pattern


def _qkv(rng, b, t, s, n=4, kh=2, d=8):
    q = jnp.asarray(rng.normal(size=(b, t, n, d)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(b, s, kh, d)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(b, s, kh, d)), jnp.float32)
    return q, k, v


# (t, s, pattern): windows of the tiny preset (16), the parity tests (4, 5), an odd one, nano's 512; a
# causal sliding window; lengths not a multiple of the block; one rectangular band (t != s).
CASES = [
    (70, 70, masks.encoder_window(70, 16)),
    (19, 19, masks.encoder_window(19, 4)),
    (23, 23, masks.encoder_window(23, 5)),
    (131, 131, masks.encoder_window(131, 7)),
    (700, 700, masks.encoder_window(700, 512)),
    (67, 67, masks.causal_window(67, 16)),
    (37, 50, masks.encoder_window(50, 12)[:37]),
]


@pytest.mark.parametrize("t,s,pattern", CASES, ids=[f"t{t}-s{s}" for t, s, _ in CASES])
def test_blocked_equals_dense(t, s, pattern):
    rng = np.random.default_rng(t + s)
    b = 3
    q, k, v = _qkv(rng, b, t, s)
    keys = np.ones((b, s), bool)
    keys[1, 2 * s // 3 :] = False
    keys[2, 3:] = False
    queries = np.ones((b, t), bool)
    queries[1, 2 * t // 3 :] = False
    queries[2, 3:] = False
    mask = masks.Mask(jnp.asarray(keys), pattern, jnp.asarray(queries))
    assert banded.band_blocking(mask, t, s) is not None  # the blocked path is taken
    dense = jnp.broadcast_to(mask.dense(), (b, t, s))
    seen = np.asarray(dense).any(-1)  # rows with at least one visible key (a fully masked row differs)
    # The cotangent of the gradient check below (on the rows that see a key), drawn ahead so that one
    # jitted program per implementation gives its output and its gradients: op-by-op dispatch of the
    # blocked path and of the eager gradients costs several times more on CPU.
    ct = jnp.asarray(rng.normal(size=(b, t, 4, 8)), jnp.float32) * jnp.asarray(seen)[:, :, None, None]

    @jax.jit
    def blocked(q, k, v):
        grad = jax.grad(lambda q, k, v: jnp.sum(dispatch.attention(q, k, v, mask, 0.3) * ct), (0, 1, 2))
        return dispatch.attention(q, k, v, mask, 0.3, impl="xla"), grad(q, k, v)

    @jax.jit
    def reference(q, k, v):
        grad = jax.grad(lambda q, k, v: jnp.sum(xla.xla_attention(q, k, v, dense, 0.3) * ct), (0, 1, 2))
        return xla.xla_attention(q, k, v, dense, 0.3), grad(q, k, v)

    out, grads = blocked(q, k, v)
    ref, refs = reference(q, k, v)
    assert out.shape == ref.shape == (b, t, 4, 8)
    np.testing.assert_allclose(np.asarray(out)[seen], np.asarray(ref)[seen], atol=2e-6, rtol=0)
    assert np.isfinite(np.asarray(out)).all()

    # Gradients with respect to q, k and v agree too.
    for g, r in zip(grads, refs):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=1e-5, rtol=0)


def test_blocked_with_softcap_and_dot_product():
    rng = np.random.default_rng(1)
    t = 45
    q, k, v = _qkv(rng, 2, t, t)
    # No query padding given and 45 queries in blocks of 4: the padded queries are marked inside.
    mask = masks.Mask(jnp.ones((2, t), bool).at[1, 30:].set(False), masks.encoder_window(t, 16))
    assert banded.band_blocking(mask, t, t).block == 4
    dense = mask.dense()
    seen = np.asarray(jnp.broadcast_to(dense, (2, t, t))).any(-1)  # row 1 from query 38 on sees no key
    assert not seen.all()
    # Each side is one jitted call (op-by-op dispatch of the blocked path is several times slower on CPU).
    np.testing.assert_allclose(
        np.asarray(jax.jit(lambda q, k, v: dispatch.attention(q, k, v, mask, 0.3, softcap=5.0))(q, k, v))[seen],
        np.asarray(jax.jit(lambda q, k, v: xla.xla_attention(q, k, v, dense, 0.3, softcap=5.0))(q, k, v))[seen],
        atol=2e-6,
    )
    np.testing.assert_allclose(
        np.asarray(jax.jit(lambda q, k, v: dispatch.attention(q, k, v, mask, 0.3, impl="dot_product"))(q, k, v))[seen],
        np.asarray(jax.jit(lambda q, k, v: xla.xla_attention(q, k, v, dense, 0.3))(q, k, v))[seen],
        atol=2e-6,
    )


def test_tiny_model_encode_blocked_equals_dense(monkeypatch):
    """The tiny preset (window 16) at 80 tokens (>= 4 windows) takes the blocked path in its sliding layer;
    its encoder states equal those of the dense attention."""
    cfg = get_preset("tiny")
    model = build_model(cfg, seed=3)
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 500, (2, 80)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, 53:] = 0
    ids[mask == 0] = 0
    window = masks.encoder_window(80, cfg.sliding_window)
    assert banded.band_blocking(masks.Mask(jnp.asarray(mask), window), 80, 80) is not None
    graphdef, state = nnx.split(model)

    def encode() -> np.ndarray:
        """model.encode as one jitted program, traced afresh on each call (op-by-op dispatch of the tiny
        model costs several times more on CPU)."""
        return np.asarray(jax.jit(lambda s, i, m: nnx.merge(graphdef, s).encode(i, m))(state, ids, mask))

    blocked = encode()
    monkeypatch.setattr(dispatch, "band_blocking", lambda *args: None)
    dense = encode()
    real = mask.astype(bool)
    np.testing.assert_allclose(blocked[real], dense[real], atol=1e-5, rtol=0)
