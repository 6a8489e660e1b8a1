"""The two jitted hot paths: passage encoding (+ MEP) and FBNL scoring over cached passage states, and the
small on-device helpers that feed the latter (exact re-pooling, gathering rows of a device-resident cache).

Both are pure functions of the split NNX state (`nnx.split(model)`), jitted once per bucketed shape:
batch sizes and lengths are padded up to buckets, so repeated calls with similar inputs reuse the
compiled program instead of recompiling.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kalm_jax import mep
from kalm_jax.model import T5Gemma2


def bucket(n: int, multiple: int) -> int:
    """Smallest multiple of `multiple` that is >= n (and >= multiple)."""
    return max(multiple, -(-n // multiple) * multiple)


def batch_bucket(n: int) -> int:
    """Batch buckets: powers of two up to 64, then multiples of 64."""
    if n <= 64:
        return 1 << max(0, (n - 1).bit_length())
    return bucket(n, 64)


def _pad_to(x: np.ndarray, rows: int, cols: int | None = None, value=0) -> np.ndarray:
    pad = [(0, rows - x.shape[0])]
    pad.append((0, (cols - x.shape[1]) if cols is not None else 0))
    pad += [(0, 0)] * (x.ndim - 2)
    return np.pad(x, pad, constant_values=value)


@functools.partial(jax.jit, static_argnames=("graphdef", "ratio"))
def encode_pool(graphdef, state, input_ids, attention_mask, ratio: int):
    """Pure jitted encoder + MEP: ([B,S] ids, [B,S] mask) -> pooled [B,C,H], mask [B,C], counts [B,C]."""
    model = nnx.merge(graphdef, state)
    states = model.encode(input_ids, attention_mask)
    return mep.pool(states, attention_mask, ratio)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def score_pairs(graphdef, state, decoder_input_ids, decoder_attention_mask, passage_states, passage_mask, yes_no):
    """Pure jitted FBNL scoring: margins [B] fp32 for decoder prompts [B,T] against passages [B,C,H]."""
    model = nnx.merge(graphdef, state)
    return model.score_margin(
        decoder_input_ids, decoder_attention_mask, passage_states, passage_mask, yes_no[0], yes_no[1]
    )


@functools.partial(jax.jit, static_argnames=("factor", "dtype"))
def repool_states(states, counts, factor: int, dtype):
    """Pure jitted exact re-pooling of cached states to `factor` x their ratio, cast to the compute `dtype`:
    ([B,C,H] fp32, [B,C] counts) -> (pooled [B,ceil(C/factor),H] dtype, mask [B,ceil(C/factor)] int32)."""
    pooled, pmask, _ = mep.repool(states, counts, factor)
    return pooled.astype(dtype), pmask


@functools.partial(jax.jit, static_argnames=("width",))
def gather_states(states, mask, rows, width: int):
    """Pure jitted on-device gather of cached passage rows for one scoring batch.

    (states [N, C, H], mask [N, C], rows [B] int32) -> (states [B, width, H], mask [B, width] int32), the
    first `width` windows (static: the batch's window bucket, <= C) of rows `rows`. `states` and `mask` stay
    where they were placed (`InferenceEngine.place`); only the [B] indices travel per batch. Indices must be
    in [0, N) (the caller checks; padding rows may gather row 0)."""
    return states[rows, :width], mask[rows, :width].astype(jnp.int32)


def encode_passages(
    model: T5Gemma2, input_ids, attention_mask, ratio: int = 4
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Array-level encode + MEP through a one-device `InferenceEngine` (see `InferenceEngine.encode_batch`).

    Returns numpy (states [B, ceil(S/r), H] float32, mask [B, C], counts [B, C]).
    """
    from kalm_jax.engine import InferenceEngine

    return InferenceEngine(model, devices=jax.local_devices()[:1], share_weights=False).encode_batch(
        input_ids, attention_mask, ratio
    )


def score(
    model: T5Gemma2, decoder_input_ids, decoder_attention_mask, passage_states, passage_mask, yes_id: int, no_id: int
) -> np.ndarray:
    """Array-level FBNL margins (fp32, [B]) through a one-device `InferenceEngine` (`score_batch`)."""
    from kalm_jax.engine import InferenceEngine

    engine = InferenceEngine(model, devices=jax.local_devices()[:1], share_weights=False, yes_id=yes_id, no_id=no_id)
    return engine.score_batch(decoder_input_ids, decoder_attention_mask, passage_states, passage_mask)


def probability(margins) -> np.ndarray:
    """P(yes) = sigmoid(margin) in fp32 (host-side; see `engine.probability`)."""
    from kalm_jax.engine import probability as _probability

    return _probability(margins)


__all__ = [
    "encode_pool",
    "score_pairs",
    "repool_states",
    "gather_states",
    "encode_passages",
    "score",
    "probability",
    "bucket",
    "batch_bucket",
]
