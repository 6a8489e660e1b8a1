"""The two jitted hot paths: passage encoding (+ MEP) and FBNL scoring over cached passage states.

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
from kalm_jax.model import T5Gemma2, _check_passages, _check_tokens


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
def score_pairs(graphdef, state, decoder_input_ids, decoder_attention_mask, passage_states, passage_mask,
                yes_no):
    """Pure jitted FBNL scoring: margins [B] fp32 for decoder prompts [B,T] against passages [B,C,H]."""
    model = nnx.merge(graphdef, state)
    return model.score_margin(decoder_input_ids, decoder_attention_mask, passage_states, passage_mask,
                              yes_no[0], yes_no[1])


def encode_passages(model: T5Gemma2, input_ids, attention_mask, ratio: int = 4, *,
                    length_multiple: int = 128) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Encodes passages once and pools them at `ratio`.

    Args:
      input_ids, attention_mask: [B, S] right-padded token ids of `prompts.document_text(...)`.
      ratio: MEP ratio r >= 1.
      length_multiple: S is padded up to a multiple of lcm(this, r) for shape bucketing.
    Returns:
      numpy (states [B, ceil(S/r), H], mask [B, ceil(S/r)], counts [B, ceil(S/r)]) with windows beyond the
      longest passage trimmed, so bucketing padding never changes the result.
    """
    ratio = mep._check_ratio(ratio)
    ids = np.asarray(input_ids)
    mask = np.asarray(attention_mask)
    _check_tokens(ids, mask, model.config, "input_ids")
    b, s = ids.shape
    multiple = int(np.lcm(length_multiple, ratio))
    ids_p = _pad_to(ids.astype(np.int32), batch_bucket(b), bucket(s, multiple), model.config.pad_token_id)
    mask_p = _pad_to(mask.astype(np.int32), batch_bucket(b), bucket(s, multiple))
    mask_p[b:, 0] = 1  # padding rows get one token so no row is all-masked; they are dropped below
    graphdef, state = nnx.split(model)
    pooled, pmask, counts = encode_pool(graphdef, state, ids_p, mask_p, ratio)
    windows = -(-s // ratio)
    return (np.asarray(pooled[:b, :windows]), np.asarray(pmask[:b, :windows]), np.asarray(counts[:b, :windows]))


def score(model: T5Gemma2, decoder_input_ids, decoder_attention_mask, passage_states, passage_mask,
          yes_id: int, no_id: int, *, window_multiple: int = 16) -> np.ndarray:
    """FBNL margins (fp32, [B]) for B (decoder prompt, cached passage) pairs; P(yes) = sigmoid(margin).

    Decoder length is padded to a multiple of 8 and passage windows to `window_multiple`; padding never
    changes a margin (padded keys are masked, padded rows are dropped).
    """
    dec = np.asarray(decoder_input_ids)
    dmask = np.asarray(decoder_attention_mask)
    states = np.asarray(passage_states)
    pmask = np.asarray(passage_mask)
    _check_tokens(dec, dmask, model.config, "decoder_input_ids")
    _check_passages(states, pmask, dec, model.config)
    for name, tok in (("yes_id", yes_id), ("no_id", no_id)):
        if not 0 <= int(tok) < model.config.vocab_size:
            raise ValueError(f"{name}={tok} is outside the vocabulary [0, {model.config.vocab_size})")
    b = dec.shape[0]
    rows = batch_bucket(b)
    dec_p = _pad_to(dec.astype(np.int32), rows, bucket(dec.shape[1], 8), model.config.pad_token_id)
    dmask_p = _pad_to(dmask.astype(np.int32), rows, bucket(dec.shape[1], 8))
    dmask_p[b:, 0] = 1
    states_p = _pad_to(states, rows, bucket(states.shape[1], window_multiple))
    pmask_p = _pad_to(pmask.astype(np.int32), rows, bucket(states.shape[1], window_multiple))
    pmask_p[b:, 0] = 1
    graphdef, state = nnx.split(model)
    margins = score_pairs(graphdef, state, dec_p, dmask_p, jnp.asarray(states_p).astype(model.dtype), pmask_p,
                          jnp.asarray([yes_id, no_id], jnp.int32))
    return np.asarray(margins[:b], dtype=np.float32)


def probability(margins) -> np.ndarray:
    """P(yes) = sigmoid(margin) = softmax([z_yes, z_no])[0], in fp32."""
    return np.asarray(jax.nn.sigmoid(jnp.asarray(margins, jnp.float32)))


__all__ = ["encode_passages", "score", "encode_pool", "score_pairs", "probability", "bucket", "batch_bucket"]
