"""Geometry of sliding-window (banded) masks: the band of a static pattern and how block-wise attention
splits it into query blocks that touch only the keys their band covers."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from kalm_jax.model.attention.masks import Mask

# ---------------------------------------------------------------------- banded (sliding-window) masks
# Largest query block, and how much wider than the band the keys of one block may be (C is the largest
# power of two <= _MAX_BLOCK whose key span is at most _MAX_SPAN_RATIO x the band width).
_MAX_BLOCK = 128
_MAX_SPAN_RATIO = 1.25


class BandBlocking(NamedTuple):
    """How `banded_attention` splits a band lo <= j - i <= hi: query blocks of `block` (C) queries, each
    attending `span` (Kb, a multiple of C) consecutive keys starting at key C·b + lo for block b."""

    lo: int
    hi: int
    block: int
    span: int


def band_limits(pattern: np.ndarray | None) -> tuple[int, int] | None:
    """(lo, hi) when the static pattern bool [T, S] is exactly the band lo <= j - i <= hi (query i, key j),
    else None (also for no pattern or an empty one). `encoder_window` and `causal_window` are bands.

    Row-wise, in O(T·S) boolean work: each row must be one run of keys, and the runs must start and end
    where the band (clipped to [0, S)) does."""
    if not isinstance(pattern, np.ndarray) or pattern.ndim != 2 or pattern.dtype != bool or not pattern.any():
        return None
    t, s = pattern.shape
    rows = np.arange(t)
    count = pattern.sum(axis=1)
    first = np.argmax(pattern, axis=1)
    last = s - 1 - np.argmax(pattern[:, ::-1], axis=1)
    some = count > 0
    lo, hi = int((first - rows)[some].min()), int((last - rows)[some].max())
    start, stop = np.maximum(rows + lo, 0), np.minimum(rows + hi, s - 1)  # the band's run in each row
    want = stop >= start
    ok = (
        np.array_equal(some, want)
        and np.array_equal(first[some], start[some])
        and np.array_equal(last[some], stop[some])
        and np.array_equal(count[some], (last - first + 1)[some])
    )
    return (lo, hi) if ok else None


def _key_span(block: int, width: int) -> int:
    """Keys (whole blocks of `block`) that hold the band keys of `block` consecutive queries: C + w - 1
    rounded up to a multiple of C."""
    return -(-(block + width - 1) // block) * block


def band_blocking(mask: Mask, t: int, s: int) -> BandBlocking | None:
    """The blocking of `banded_attention` for `mask` over t queries and s keys, or None when its pattern
    is not a band or when blocking would not skip keys (the span of a query block is not < s)."""
    band = band_limits(mask.pattern)
    if band is None:
        return None
    lo, hi = band
    width = hi - lo + 1
    block = next(
        c
        for c in (_MAX_BLOCK >> i for i in range(_MAX_BLOCK.bit_length()))
        if _key_span(c, width) <= _MAX_SPAN_RATIO * width or c == 1
    )
    span = _key_span(block, width)
    return BandBlocking(lo, hi, block, span) if span < s else None
