"""Reranker losses over FBNL margins m = logit(yes) - logit(no), per (query, passage) pair.

Shapes: B queries, G passages per query (positive at g=0 in the training pipeline). Every loss returns a
scalar mean over its valid pairs (or groups), in fp32.

* `pointwise_nll`: NLL of the gold token ("yes" for positives, "no" for negatives) under the 2-way
  softmax over {yes, no} — equal to binary cross-entropy of sigmoid(m) against the 0/1 label, and the same
  softmax that inference uses. The paper's SFT loss is an NLL of the gold token at the scoring position; whether
  over the full vocabulary or the 2-way {yes, no} softmax it does not say (an open choice: this is the default).
* `full_vocab_nll`: the same NLL under the full-vocabulary softmax (log p = z - logsumexp over V).
* `distill_bce`: BCE of sigmoid(m) against the teacher's P(yes) (stage 3 distillation).
* `listwise_ce`: softmax cross-entropy over each group's margins (FlagEmbedding's group loss), the
  target distribution being the normalised labels.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

LOSS_NAMES = ("pointwise", "full_vocab", "distill", "listwise")


def _masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    mask = mask.astype(jnp.float32)
    return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def pointwise_nll(margins: jax.Array, labels: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """2-way yes/no NLL: -[y·log σ(m) + (1-y)·log σ(-m)]; margins/labels [B, G], mask [B, G] (1 = use)."""
    m = margins.astype(jnp.float32)
    y = labels.astype(jnp.float32)
    nll = -(y * jax.nn.log_sigmoid(m) + (1.0 - y) * jax.nn.log_sigmoid(-m))
    return _masked_mean(nll, jnp.ones_like(m) if mask is None else mask)


def full_vocab_nll(
    logp_yes: jax.Array, logp_no: jax.Array, labels: jax.Array, mask: jax.Array | None = None
) -> jax.Array:
    """Full-vocabulary NLL of the gold token: -[y·log p(yes) + (1-y)·log p(no)]; inputs [B, G]."""
    y = labels.astype(jnp.float32)
    nll = -(y * logp_yes.astype(jnp.float32) + (1.0 - y) * logp_no.astype(jnp.float32))
    return _masked_mean(nll, jnp.ones_like(nll) if mask is None else mask)


def teacher_probability(teacher: jax.Array, teacher_format: str) -> jax.Array:
    """Teacher scores as P(yes): 'prob' passes them through, 'logit' applies a sigmoid (margins/logits)."""
    if teacher_format == "prob":
        return teacher.astype(jnp.float32)
    if teacher_format == "logit":
        return jax.nn.sigmoid(teacher.astype(jnp.float32))
    raise ValueError(f"teacher_format must be 'prob' or 'logit', got {teacher_format!r}")


def distill_bce(margins: jax.Array, teacher_p: jax.Array, teacher_mask: jax.Array) -> jax.Array:
    """BCE of the student's sigmoid(m) against teacher P(yes) [B, G] where teacher_mask [B, G] is 1.

    Pairs without a teacher score (NaN, mask 0) contribute nothing (NaNs are replaced before use so they
    cannot leak into gradients).
    """
    m = margins.astype(jnp.float32)
    valid = teacher_mask > 0
    t = jnp.where(valid, jnp.nan_to_num(teacher_p.astype(jnp.float32)), 0.0)
    bce = -(t * jax.nn.log_sigmoid(m) + (1.0 - t) * jax.nn.log_sigmoid(-m))
    return _masked_mean(bce, valid)


def listwise_ce(margins: jax.Array, labels: jax.Array, temperature: float = 1.0) -> jax.Array:
    """Group softmax cross-entropy: -Σ_g q_g·log softmax(m/τ)_g with q = labels / Σ labels; [B, G] -> scalar.

    Groups without a positive label are ignored.
    """
    logp = jax.nn.log_softmax(margins.astype(jnp.float32) / temperature, axis=-1)
    y = labels.astype(jnp.float32)
    total = jnp.sum(y, axis=-1, keepdims=True)
    q = y / jnp.maximum(total, 1e-9)
    ce = -jnp.sum(q * logp, axis=-1)
    return _masked_mean(ce, total[:, 0] > 0)


def combine(terms: dict[str, jax.Array], weights: dict[str, float]) -> jax.Array:
    """Σ weight·term over the terms whose weight is non-zero."""
    total = jnp.zeros((), jnp.float32)
    for name, value in terms.items():
        w = float(weights.get(name, 0.0))
        if w:
            total = total + w * value
    return total


__all__ = [
    "pointwise_nll",
    "full_vocab_nll",
    "distill_bce",
    "listwise_ce",
    "teacher_probability",
    "combine",
    "LOSS_NAMES",
]
