"""The jitted hot paths: passage encoding (+ MEP) and FBNL scoring over cached passage states, and the
small on-device helpers that feed the latter (exact re-pooling, gathering rows of a device-resident cache).

All are pure functions of the split NNX state (`nnx.split(model)`), jitted once per bucketed shape:
batch sizes and lengths are padded up to buckets (`bucket`, `batch_bucket`), so repeated calls with similar
inputs reuse the compiled program instead of recompiling. `InferenceEngine` is their one caller.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from kalm_jax.inference.states import quantize_int8
from kalm_jax.model import mep


def bucket(n: int, multiple: int) -> int:
    """Smallest multiple of `multiple` that is >= n (and >= multiple)."""
    return max(multiple, -(-n // multiple) * multiple)


def batch_bucket(n: int) -> int:
    """Batch buckets: powers of two up to 64, then multiples of 64."""
    if n <= 64:
        return 1 << max(0, (n - 1).bit_length())
    return bucket(n, 64)


@functools.partial(jax.jit, static_argnames=("graphdef", "ratio"))
def encode_pool(graphdef, state, input_ids, attention_mask, ratio: int):
    """Pure jitted encoder + MEP: ([B,S] ids, [B,S] mask) -> pooled [B,C,H], mask [B,C], counts [B,C]."""
    model = nnx.merge(graphdef, state)
    states = model.encode(input_ids, attention_mask)
    return mep.pool(states, attention_mask, ratio)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def score_pairs(
    graphdef, state, decoder_input_ids, decoder_attention_mask, passage_states, passage_mask, yes_no, passage_scale=None
):
    """Pure jitted FBNL scoring: margins [B] fp32 for decoder prompts [B,T] against passages [B,C,H].

    With `passage_scale` [B,C] fp32 the passages are int8 (`states.quantize_int8`) and each decoder layer
    dequantizes them where it projects them (`T5Gemma2.score_margin`)."""
    model = nnx.merge(graphdef, state)
    return model.score_margin(
        decoder_input_ids, decoder_attention_mask, passage_states, passage_mask, yes_no[0], yes_no[1], passage_scale
    )


@functools.partial(jax.jit, static_argnames=("factor", "dtype"))
def repool_states(states, counts, factor: int, dtype):
    """Pure jitted exact re-pooling of cached states to `factor` x their ratio, cast to the compute `dtype`:
    ([B,C,H] fp32, [B,C] counts) -> (pooled [B,ceil(C/factor),H] dtype, mask [B,ceil(C/factor)] int32, None).

    `dtype` int8: the pooled fp32 windows are quantized again (`states.quantize_int8`, the host's quantizer on
    the device): (values int8, mask, scale [B,ceil(C/factor)] fp32). Re-quantizing, not keeping fp32, is what
    keeps the batch int8 on the device; it adds one rounding (half a step of the pooled window's scale) over
    the host's ``PassageStates.repool`` in fp32, the same one ``PassageStates.to_ratio`` makes for int8 storage."""
    pooled, pmask, _ = mep.repool(states, counts, factor)
    if jnp.dtype(dtype) == jnp.int8:
        values, scale = quantize_int8(pooled, xp=jnp)
        return values, pmask, scale
    return pooled.astype(dtype), pmask, None


@functools.partial(jax.jit, static_argnames=("width",))
def gather_states(states, mask, rows, width: int, scale=None):
    """Pure jitted on-device gather of cached passage rows for one scoring batch.

    (states [N, C, H], mask [N, C], rows [B] int32) -> (states [B, width, H], mask [B, width] int32, scale), the
    first `width` windows (static: the batch's window bucket, <= C) of rows `rows`; `scale` [N, C] (int8
    states) is gathered alike to [B, width] (None stays None). `states` and `mask` stay where they were placed
    (`InferenceEngine.place`); only the [B] indices travel per batch. Indices must be in [0, N) (the caller
    checks; padding rows may gather row 0)."""
    return (
        states[rows, :width],
        mask[rows, :width].astype(jnp.int32),
        None if scale is None else scale[rows, :width],
    )
