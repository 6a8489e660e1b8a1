"""Attention masks: the encoder's and decoder's window patterns and the structured `Mask`
(key padding [B, S] + a static pattern [T, S]) that kernels take without materialising it per row."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

NEG = float(np.finfo(np.float32).min)  # the score of a masked key


def encoder_window(length: int, window: int) -> np.ndarray:
    """Bidirectional sliding-window pattern (bool [S, S], no batch axis, a compile-time constant).

    Key j is visible from query i when 0 <= i-j < (W+1)//2 or 0 < j-i < W//2 + 1 (W keys in all).
    """
    dist = np.arange(length)[:, None] - np.arange(length)[None, :]
    return ((dist >= 0) & (dist < (window + 1) // 2)) | ((dist < 0) & (-dist < window // 2 + 1))


def causal_window(length: int, window: int | None = None) -> np.ndarray:
    """Causal pattern (bool [T, T]): key j <= query i, and i - j < W when `window` is given."""
    i = np.arange(length)[:, None]
    j = np.arange(length)[None, :]
    ok = j <= i
    return ok & ((i - j) < window) if window is not None else ok


class Mask(NamedTuple):
    """An attention mask kept in structured form, so that a kernel can see which blocks are empty.

    keys: key padding, bool or 0/1 [B, S] (true = a real key).
    pattern: static bool [T, S] (numpy: a compile-time constant) ANDed with `keys`; None = every key.
    queries: query padding, bool or 0/1 [B, T], or None (every query real). It does not change the mask:
      the output at a padding query is never read, and a kernel may use it (e.g. as segment ids) so that
      such a row attends only padding keys.
    The whole mask is `keys[:, None, :] & pattern[None]`; `dense()` builds that expression.
    """

    keys: jax.Array
    pattern: np.ndarray | None = None
    queries: jax.Array | None = None

    def dense(self) -> jax.Array:
        """bool, broadcastable to [B, T, S]: [B, 1, S] without a pattern, else [B, T, S]. Nothing of size
        B·T·S is built ahead: XLA fuses this expression into the score masking."""
        keys = self.keys.astype(bool)[:, None, :]
        return keys if self.pattern is None else keys & jnp.asarray(self.pattern)[None]


def dense_mask(mask: Mask | jax.Array) -> jax.Array:
    """A `Mask` as its dense boolean expression; a boolean array (broadcastable to [B, T, S]) as it is."""
    return mask.dense() if isinstance(mask, Mask) else mask


def concat_masks(a: Mask | jax.Array, b: Mask | jax.Array, t: int, s_a: int, s_b: int) -> Mask | jax.Array:
    """The mask of keys [a-keys ; b-keys] for t queries: structured when both are, else dense [B, t, s_a + s_b]."""
    if isinstance(a, Mask) and isinstance(b, Mask):
        pa = np.ones((t, s_a), bool) if a.pattern is None else np.broadcast_to(a.pattern, (t, s_a))
        pb = np.ones((t, s_b), bool) if b.pattern is None else np.broadcast_to(b.pattern, (t, s_b))
        pattern = np.concatenate([pa, pb], axis=1)
        keys = jnp.concatenate([a.keys.astype(bool), b.keys.astype(bool)], axis=1)
        return Mask(keys, None if pattern.all() else pattern, a.queries if a.queries is not None else b.queries)
    da, db = dense_mask(a), dense_mask(b)
    batch = max(da.shape[0], db.shape[0])
    return jnp.concatenate([jnp.broadcast_to(da, (batch, t, s_a)), jnp.broadcast_to(db, (batch, t, s_b))], axis=-1)
