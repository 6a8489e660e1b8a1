"""Array-level encoding and scoring for callers that hold token arrays, not texts: thin wrappers over the one
`InferenceEngine` on one local device (the engine's jitted programs are in `kalm_jax.inference.programs`)."""

from __future__ import annotations

import collections
import threading
import weakref

import jax
import numpy as np
from flax import nnx

from kalm_jax.inference.engine import InferenceEngine
from kalm_jax.model.t5gemma2 import T5Gemma2

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


__all__ = ["encode_passages", "score", "array_engine", "clear_array_engines", "ARRAY_ENGINES"]
