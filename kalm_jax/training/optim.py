"""The optimiser: AdamW with linear warmup + cosine decay, global-norm clipping and gradient accumulation.

With gradient accumulation (`optimizer.grad_accum_steps` = k > 1) the chain is wrapped in
`optax.MultiSteps`: each train step consumes one micro-batch, and the parameters change every k-th step
(with the mean gradient of the k micro-batches). The schedule counts optimiser updates, not micro-steps.

Only the trainable subset of the parameters is handed to the optimiser (LoRA factors with LoRA, every
parameter in full fine-tuning; see `step.py`), so frozen weights carry no optimiser state.
"""

from __future__ import annotations

from typing import Any

import optax


def schedule(opt: Any, total_steps: int) -> optax.Schedule:
    """Linear warmup 0 -> lr over `warmup_steps` updates, then cosine decay to lr·end_lr_ratio."""
    accum = max(1, int(opt.grad_accum_steps))
    updates = max(1, int(total_steps) // accum)
    warmup = min(int(opt.warmup_steps), max(updates - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=float(opt.lr),
        warmup_steps=warmup,
        decay_steps=max(updates, warmup + 1),
        end_value=float(opt.lr) * float(opt.end_lr_ratio),
    )


def make_optimizer(opt: Any, total_steps: int) -> optax.GradientTransformation:
    """optax chain from the `optimizer` config section (lr, warmup_steps, end_lr_ratio, b1, b2, eps,
    weight_decay, clip_norm, grad_accum_steps)."""
    sched = schedule(opt, total_steps)
    parts = []
    if float(opt.clip_norm) > 0:
        parts.append(optax.clip_by_global_norm(float(opt.clip_norm)))
    parts.append(
        optax.adamw(sched, b1=float(opt.b1), b2=float(opt.b2), eps=float(opt.eps), weight_decay=float(opt.weight_decay))
    )
    tx = optax.chain(*parts)
    if int(opt.grad_accum_steps) > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=int(opt.grad_accum_steps))
    return tx


__all__ = ["make_optimizer", "schedule"]
