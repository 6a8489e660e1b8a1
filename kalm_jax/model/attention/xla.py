"""The einsum attention reference (the parity-tested numerics): grouped-query attention and the merged
self+cross attention of the decoder, fp32 scores and softmax.

Shape letters: B batch, T query length, S key length, N query heads, K kv heads, G = N/K, D head dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kalm_jax.model.attention.masks import NEG


def xla_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float, softcap: float | None = None
) -> jax.Array:
    """Grouped-query softmax attention in plain XLA (einsums).

    q [B, T, N, D], k/v [B, S, K, D], mask bool [B, T, S] -> [B, T, N, D]. Scores and softmax in fp32.
    Fully masked rows give a uniform average (as HF's additive finfo.min mask does).
    """
    b, t, n, d = q.shape
    kh = k.shape[2]
    qg = q.reshape(b, t, kh, n // kh, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
    if softcap is not None:
        scores = jnp.tanh(scores / softcap) * softcap
    scores = jnp.where(mask[:, None, None, :, :], scores, NEG)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(b, t, n, d)


def xla_merged_attention(q, ks, vs, self_mask, kc, vc, cross_mask, scale: float) -> jax.Array:
    """Einsum form of `merged_attention` (fp32 scores and softmax; fully masked rows: uniform average)."""
    b, t, n, d = q.shape
    kh = ks.shape[2]
    qg = q.reshape(b, t, kh, n // kh, d)

    def scores(k, mask):
        sc = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
        return jnp.where(mask[:, None, None, :, :], sc, NEG)

    s1, s2 = scores(ks, self_mask), scores(kc, cross_mask)
    m = jax.lax.stop_gradient(jnp.maximum(s1.max(-1, keepdims=True), s2.max(-1, keepdims=True)))
    e1, e2 = jnp.exp(s1 - m), jnp.exp(s2 - m)
    z = e1.sum(-1, keepdims=True) + e2.sum(-1, keepdims=True)
    out = jnp.einsum(
        "bkgts,bskd->btkgd", (e1 / z).astype(vs.dtype), vs, preferred_element_type=jnp.float32
    ) + jnp.einsum("bkgts,bskd->btkgd", (e2 / z).astype(vc.dtype), vc, preferred_element_type=jnp.float32)
    return out.astype(q.dtype).reshape(b, t, n, d)
