"""The two jitted hot paths: passage encoding (+ MEP) and FBNL scoring over cached passage states, and the
small on-device helpers that feed the latter (exact re-pooling, gathering rows of a device-resident cache).

Both are pure functions of the split NNX state (`nnx.split(model)`), jitted once per bucketed shape:
batch sizes and lengths are padded up to buckets, so repeated calls with similar inputs reuse the
compiled program instead of recompiling.
"""

from __future__ import annotations

import collections
import functools
import threading
import weakref

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


ARRAY_ENGINES = 2
"""How many models' engines the array-level functions keep (least recently used dropped first)."""

_array_engines: collections.OrderedDict[int, tuple] = collections.OrderedDict()
_array_engines_lock = threading.Lock()


def array_engine(model: T5Gemma2):
    """The one-device `InferenceEngine` that `encode_passages` and `score` run `model` on.

    It is built (and the weights placed) on the first call for `model` and reused while the model holds the
    same weights: the same jax arrays as leaves (jax arrays are immutable, so new weights mean new leaves;
    they are compared by identity) and the same structure (`nnx.graphdef`, which carries `attention_impl`,
    LoRA adapters, dtypes). A model with any non-jax leaf (e.g. numpy, which can change in place) gets a new
    engine on every call. The `ARRAY_ENGINES` most recently used models keep theirs (the engine holds the
    model and its placed weights until dropped; `clear_array_engines` drops them all).
    """
    from kalm_jax.engine import InferenceEngine

    devices = jax.local_devices()[:1]
    graphdef, state = nnx.split(model)
    leaves = jax.tree.leaves(state)
    cacheable = all(isinstance(x, jax.Array) and not x.is_deleted() for x in leaves)
    key = id(model)
    with _array_engines_lock:
        entry = _array_engines.get(key)
        if (
            cacheable
            and entry is not None
            and entry[0] is model
            and entry[1] == graphdef
            and entry[3] == devices
            and len(entry[2]) == len(leaves)
            and all(ref() is x for ref, x in zip(entry[2], leaves))
        ):
            _array_engines.move_to_end(key)
            return entry[4]
        _array_engines.pop(key, None)
    engine = InferenceEngine(model, devices=devices, share_weights=False, show_progress=False)
    if cacheable:
        with _array_engines_lock:
            _array_engines[key] = (model, graphdef, [weakref.ref(x) for x in leaves], devices, engine)
            while len(_array_engines) > ARRAY_ENGINES:
                _array_engines.popitem(last=False)
    return engine


def clear_array_engines() -> None:
    """Drops the engines (and placed weights) kept by `array_engine`."""
    with _array_engines_lock:
        _array_engines.clear()


def encode_passages(
    model: T5Gemma2, input_ids, attention_mask, ratio: int = 4
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Array-level encode + MEP through the model's one-device engine (`array_engine`; see
    `InferenceEngine.encode_batch`): the weights are placed on the first call only.

    Returns numpy (states [B, ceil(S/r), H] float32, mask [B, C], counts [B, C]).
    """
    return array_engine(model).encode_batch(input_ids, attention_mask, ratio)


def score(
    model: T5Gemma2, decoder_input_ids, decoder_attention_mask, passage_states, passage_mask, yes_id: int, no_id: int
) -> np.ndarray:
    """Array-level FBNL margins (fp32, [B]) through the model's one-device engine (`array_engine`;
    `InferenceEngine.score_batch`): the weights are placed on the first call only."""
    return array_engine(model).score_batch(
        decoder_input_ids, decoder_attention_mask, passage_states, passage_mask, yes_id=yes_id, no_id=no_id
    )


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
    "array_engine",
    "clear_array_engines",
    "ARRAY_ENGINES",
    "probability",
    "bucket",
    "batch_bucket",
]
