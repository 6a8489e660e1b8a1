"""Grouped-query attention on TPU with the Pallas TPU flash-attention kernel.

Same contract as `kalm_jax.layers.attention` (q [B, T, N, D], k/v [B, S, K, D], bool mask [B, T, S] ->
[B, T, N, D]); `layers.attention` dispatches here when the program is lowered for TPU (including AOT
lowering for a TPU topology on a CPU host). The mask is passed to the kernel as an additive fp32 bias,
so every mask the model builds (bidirectional + sliding window, merged causal + passage keys, padding)
works unchanged, with the scores never materialised in HBM.

GQA without repeating K/V: the G = N/K query heads that share a KV head are folded into the query
length, q -> [B, K, G·T, D], and the bias is tiled G times along it. Lengths are padded to the kernel's
block sizes (padded keys masked, padded query rows dropped).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu import flash_attention as _fa
from jax.sharding import PartitionSpec as P

from kalm_jax.mesh import BATCH, DEFAULT_RULES

# Mesh axes the batch may be split over: the "batch" rule of the one mesh module (kalm_jax/mesh.py).
BATCH_AXES: tuple[str, ...] = tuple(dict(DEFAULT_RULES)[BATCH])

# Large enough that exp(scale·(score + _NEG)) is 0 for any real score, small enough that the kernel's
# online softmax stays finite on fully masked rows (biases near the fp32 limit give NaN there).
_NEG = -1e9
_BLOCK = 128


def _q_block_and_pad(n: int) -> tuple[int, int]:
    """(block, padded length) of the query axis: one block when n <= 128 (rounded up to 8), else 128s."""
    if n <= _BLOCK:
        padded = -(-n // 8) * 8
        return padded, padded
    return _BLOCK, -(-n // _BLOCK) * _BLOCK


def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask, scale: float,
                    softcap: float | None = None) -> jax.Array:
    """Pallas TPU flash attention with the `layers.attention` signature (see module docstring).

    Scores, softmax and accumulation run in fp32 inside the kernel; the output has q's dtype.
    Fully masked query rows (padding) get a finite softmax over their raw scores, never NaN.

    Mosaic kernels are not partitioned by XLA: under a mesh context (`jax.set_mesh(mesh)`), the kernel
    runs per shard in a `shard_map` over the batch axes (`data`, `fsdp`, those that divide the batch);
    other mesh axes see the full batch slice.
    """
    if softcap is not None:
        raise NotImplementedError("attention logit soft-capping is not supported by the TPU flash kernel; "
                                  "set kalm_jax.layers.TPU_ATTENTION_IMPL = 'xla'")
    from kalm_jax.layers import dense_mask

    mask = jnp.broadcast_to(dense_mask(mask), (q.shape[0], q.shape[1], k.shape[1]))
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return _flash(q, k, v, mask, scale)
    axes: tuple[str, ...] = ()
    for name in BATCH_AXES:
        if name in mesh.axis_names and mesh.shape[name] > 1 and q.shape[0] % (_size(mesh, axes) * mesh.shape[name]) == 0:
            axes += (name,)
    spec = P(axes if axes else None)
    fn = jax.shard_map(lambda q, k, v, m: _flash(q, k, v, m, scale), mesh=mesh, in_specs=(spec,) * 4,
                       out_specs=spec, check_vma=False)
    return fn(q, k, v, mask)


def _size(mesh, axes: tuple[str, ...]) -> int:
    return int(np.prod([mesh.shape[a] for a in axes])) if axes else 1


def _flash(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float) -> jax.Array:
    b, t, n, d = q.shape
    s, kh = k.shape[1], k.shape[2]
    g = n // kh
    # [B, T, K, G, D] -> [B, K, G, T, D] -> [B, K, G·T, D]
    qf = q.reshape(b, t, kh, g, d).transpose(0, 2, 3, 1, 4).reshape(b, kh, g * t, d)
    kf = k.transpose(0, 2, 1, 3)
    vf = v.transpose(0, 2, 1, 3)
    bias = jnp.where(mask, 0.0, _NEG).astype(jnp.float32)  # [B, T, S]

    block_q, tq = _q_block_and_pad(g * t)
    block_k, sk = _BLOCK, -(-s // _BLOCK) * _BLOCK  # the kernel keeps softmax stats in 128-lane tiles
    bias = jnp.tile(bias[:, None], (1, kh, g, 1))  # [B, K, G·T, S]
    if sk != s:
        kf = jnp.pad(kf, ((0, 0), (0, 0), (0, sk - s), (0, 0)))
        vf = jnp.pad(vf, ((0, 0), (0, 0), (0, sk - s), (0, 0)))
        bias = jnp.pad(bias, ((0, 0), (0, 0), (0, 0), (0, sk - s)), constant_values=_NEG)
    if tq != g * t:
        qf = jnp.pad(qf, ((0, 0), (0, 0), (0, tq - g * t), (0, 0)))
        bias = jnp.pad(bias, ((0, 0), (0, 0), (0, tq - g * t), (0, 0)))
    blocks = _fa.BlockSizes(
        block_q=block_q, block_k_major=block_k, block_k=block_k, block_b=1,
        block_q_major_dkv=block_q, block_k_major_dkv=block_k, block_k_dkv=block_k, block_q_dkv=block_q,
        block_k_major_dq=block_k, block_k_dq=block_k, block_q_dq=block_q,
    )
    out = _fa.flash_attention(qf, kf, vf, bias, sm_scale=float(scale), block_sizes=blocks)
    out = out[:, :, : g * t].reshape(b, kh, g, t, d).transpose(0, 3, 1, 2, 4)
    return out.reshape(b, t, n, d).astype(q.dtype)


__all__ = ["flash_attention"]
