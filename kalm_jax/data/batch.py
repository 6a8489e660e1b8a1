"""The training batch contract: the one place that says which arrays a batch holds, their shapes and dtypes.

The input pipeline (`kalm_jax.data.pipeline`) produces exactly these arrays; the train step
(`kalm_jax.training.step`) consumes the `STEP_KEYS` subset (`example_id` is for checks and debugging).
Meaning of each array: see `kalm_jax.data.pipeline`'s module docstring.
"""

from __future__ import annotations

import numpy as np

STEP_KEYS = ("enc_ids", "enc_mask", "passage_index", "dec_ids", "dec_mask", "labels", "teacher", "teacher_mask")
"""The arrays the train step reads."""

BATCH_KEYS = (*STEP_KEYS, "example_id")
"""Every array of a pipeline batch."""


def batch_shapes(
    batch_size: int, group_size: int, passage_len: int, decoder_len: int
) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """(shape, dtype) of every array of a batch of `batch_size` queries (B) with `group_size` passages (G) each
    of `passage_len` tokens (S) and decoder prompts of `decoder_len` tokens (T), in `BATCH_KEYS` order."""
    b, g, s, t = batch_size, group_size, passage_len, decoder_len
    i32, f32 = np.dtype(np.int32), np.dtype(np.float32)
    return {
        "enc_ids": ((b * g, s), i32),
        "enc_mask": ((b * g, s), i32),
        "passage_index": ((b, g), i32),
        "dec_ids": ((b, t), i32),
        "dec_mask": ((b, t), i32),
        "labels": ((b, g), f32),
        "teacher": ((b, g), f32),
        "teacher_mask": ((b, g), f32),
        "example_id": ((b,), i32),
    }


__all__ = ["STEP_KEYS", "BATCH_KEYS", "batch_shapes"]
