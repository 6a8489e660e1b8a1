"""KaLM's yes/no head: the relevance margin logit("yes") - logit("no") from the decoder's last hidden state.

Only the two tied-embedding rows of "yes" and "no" are read (full-vocabulary logits are never built). Used by
`T5Gemma2.score_margin` (inference) and `kalm_jax.training.step.pair_scores` (training), so both score alike.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def softcap(logits: jax.Array, cap: float | None) -> jax.Array:
    """Final-logit soft-capping, cap·tanh(logits / cap); `cap` None leaves the logits as they are."""
    return logits if cap is None else jnp.tanh(logits / cap) * cap


def yes_no_logits(
    hidden: jax.Array, embedding: jax.Array, yes_id, no_id, *, dtype=None, cap: float | None = None
) -> jax.Array:
    """Soft-capped logits [B, 2] in fp32 of "yes" (column 0) and "no" (column 1).

    hidden [B, H]: final-norm decoder states at the scored position; embedding [V, H]: the tied LM head;
    yes_id / no_id: token ids (ints or traced int scalars); dtype: the compute dtype the two rows are cast to
    (default: hidden's); cap: the config's `final_logit_softcapping`. The dot products accumulate in fp32.
    """
    rows = jnp.take(embedding, jnp.asarray([yes_id, no_id]), axis=0).astype(dtype or hidden.dtype)
    return softcap(jnp.einsum("bh,vh->bv", hidden, rows, preferred_element_type=jnp.float32), cap)


def margin(
    hidden: jax.Array, embedding: jax.Array, yes_id, no_id, *, dtype=None, cap: float | None = None
) -> jax.Array:
    """logit(yes) - logit(no) [B] in fp32 (see `yes_no_logits`); P(yes) = sigmoid(margin)."""
    logits = yes_no_logits(hidden, embedding, yes_id, no_id, dtype=dtype, cap=cap)
    return logits[:, 0] - logits[:, 1]


__all__ = ["margin", "softcap", "yes_no_logits"]
