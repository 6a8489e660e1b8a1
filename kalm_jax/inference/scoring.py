"""Array-level encoding and scoring for callers that hold token arrays, not texts: thin wrappers over the one
`InferenceEngine` on one local device (the engine's jitted programs are in `kalm_jax.inference.programs`)."""

from __future__ import annotations

import jax
import numpy as np

from kalm_jax.inference.engine import InferenceEngine
from kalm_jax.model.t5gemma2 import T5Gemma2


def encode_passages(
    model: T5Gemma2, input_ids, attention_mask, ratio: int = 4
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Array-level encode + MEP through a one-device `InferenceEngine` (see `InferenceEngine.encode_batch`).

    Returns numpy (states [B, ceil(S/r), H] float32, mask [B, C], counts [B, C]).
    """
    return InferenceEngine(model, devices=jax.local_devices()[:1], share_weights=False).encode_batch(
        input_ids, attention_mask, ratio
    )


def score(
    model: T5Gemma2, decoder_input_ids, decoder_attention_mask, passage_states, passage_mask, yes_id: int, no_id: int
) -> np.ndarray:
    """Array-level FBNL margins (fp32, [B]) through a one-device `InferenceEngine` (`score_batch`)."""
    engine = InferenceEngine(model, devices=jax.local_devices()[:1], share_weights=False, yes_id=yes_id, no_id=no_id)
    return engine.score_batch(decoder_input_ids, decoder_attention_mask, passage_states, passage_mask)


__all__ = ["encode_passages", "score"]
