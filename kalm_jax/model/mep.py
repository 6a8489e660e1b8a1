"""Matryoshka Embedding Pooling: mask-aware means of consecutive r-token windows, and exact re-pooling.

`pool` follows the released `pool_encoder_chunks`: windows aligned at position 0, ceil(n/r) of them, the
last partial window averaged over its valid tokens, windows without valid tokens masked out. It also
returns the per-window token counts, which make `repool` exact: a cache at ratio r serves every k·r.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


def check_ratio(ratio) -> int:
    if isinstance(ratio, bool) or not isinstance(ratio, int):
        try:
            as_int = int(ratio)
        except (TypeError, ValueError):
            raise ValueError(f"pooling ratio must be a positive integer, got {ratio!r}") from None
        if as_int != ratio:
            raise ValueError(f"pooling ratio must be a positive integer, got {ratio!r}")
        ratio = as_int
    if ratio < 1:
        raise ValueError(f"pooling ratio must be >= 1, got {ratio}")
    return ratio


def _windows(x: jax.Array, r: int) -> jax.Array:
    """[B, N, ...] -> [B, ceil(N/r), r, ...], right-padded with zeros."""
    b, n = x.shape[:2]
    c = -(-n // r)
    pad = [(0, 0), (0, c * r - n)] + [(0, 0)] * (x.ndim - 2)
    return jnp.pad(x, pad).reshape(b, c, r, *x.shape[2:])


def _weighted_window_mean(values: jax.Array, weights: jax.Array, size: int):
    """Per window of `size` rows: sum(w·v) / max(1, sum(w)) in fp32; also (sum(w) > 0) and sum(w), int32.

    values [B, N, H], integer weights [B, N] (a 0/1 token mask for `pool`, window counts for `repool`).
    A window longer than the rows (N <= size: one window) is taken as N rows, not zero-padded to `size`.
    """
    size = max(1, min(size, values.shape[1]))
    w = _windows(jnp.asarray(weights, jnp.int32), size)
    v = _windows(jnp.asarray(values).astype(jnp.float32), size)
    total = w.sum(axis=2)
    sums = jnp.einsum("bck,bckh->bch", w.astype(jnp.float32), v)
    mean = sums / jnp.maximum(total, 1)[..., None].astype(jnp.float32)
    return mean.astype(values.dtype), (total > 0).astype(jnp.int32), total.astype(jnp.int32)


def pool(states: jax.Array, mask: jax.Array, ratio: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Mask-aware mean of consecutive `ratio`-token windows.

    Args:
      states: [B, N, H] encoder states (final norm applied).
      mask: [B, N] 0/1 token mask (right padded).
      ratio: window size r >= 1.
    Returns:
      pooled [B, ceil(N/r), H] (dtype of `states`; sums in fp32), pooled_mask [B, C] int32 (1 where the
      window has a valid token), counts [B, C] int32 (valid tokens per window).
    """
    r = check_ratio(ratio)
    if states.ndim != 3 or mask.shape != states.shape[:2]:
        raise ValueError(f"pool expects states [B, N, H] and mask [B, N]; got {states.shape} and {mask.shape}")
    return _weighted_window_mean(states, mask, r)


def repool(pooled: jax.Array, counts: jax.Array, factor: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Turns states pooled at ratio r into ratio factor·r exactly (count-weighted mean of `factor` windows).

    Args:
      pooled: [B, C, H] pooled states at ratio r.
      counts: [B, C] valid-token counts per window (from `pool` or an earlier `repool`).
      factor: k >= 1.
    Returns:
      pooled [B, ceil(C/k), H], pooled_mask [B, ceil(C/k)] int32, counts [B, ceil(C/k)] int32.
    """
    k = check_ratio(factor)
    if pooled.ndim != 3 or counts.shape != pooled.shape[:2]:
        raise ValueError(f"repool expects pooled [B, C, H] and counts [B, C]; got {pooled.shape}, {counts.shape}")
    return _weighted_window_mean(pooled, counts, k)


@dataclasses.dataclass(frozen=True)
class RatioLayout:
    """Where each ratio's windows sit in a passage's packed windows of several MEP ratios (`pool_packed`).

    The packed windows of one passage are the ratios' windows one after the other ([P, sum(lengths), ...]);
    `unpack` turns them into one row per (passage, ratio), row = passage·R + k, each padded with zeros to
    the longest ratio's count ([P·R, width, ...]). Row-wise maps (the decoder's key/value projections)
    applied to the packed form cost the real windows only; `unpack` their outputs for the attention.
    """

    lengths: tuple[int, ...]

    @property
    def width(self) -> int:
        return max(self.lengths)

    @property
    def total(self) -> int:
        return sum(self.lengths)

    def unpack(self, x: jax.Array) -> jax.Array:
        """[P, total, ...] -> [P·R, width, ...] (zero-padded rows, passage-major)."""
        if x.ndim < 2 or x.shape[1] != self.total:
            raise ValueError(f"packed windows must be [passages, {self.total}, ...], got {x.shape}")
        rows, start = [], 0
        for n in self.lengths:
            pad = [(0, 0), (0, self.width - n)] + [(0, 0)] * (x.ndim - 2)
            rows.append(jnp.pad(x[:, start : start + n], pad))
            start += n
        return jnp.stack(rows, axis=1).reshape(x.shape[0] * len(self.lengths), self.width, *x.shape[2:])


def pool_packed(
    states: jax.Array, mask: jax.Array, ratios: tuple[int, ...]
) -> tuple[jax.Array, jax.Array, RatioLayout]:
    """`pool` at every ratio of `ratios`, packed per passage: states [B, N, H], mask [B, N] ->
    (pooled [B, C, H], pooled_mask [B, C] int32, layout) with C = sum over ratios of ceil(N/r)."""
    pooled = [pool(states, mask, r)[:2] for r in ratios]
    layout = RatioLayout(tuple(int(p.shape[1]) for p, _ in pooled))
    return (jnp.concatenate([p for p, _ in pooled], axis=1), jnp.concatenate([m for _, m in pooled], axis=1), layout)


__all__ = ["pool", "repool", "pool_packed", "RatioLayout"]
