"""Grouped-query attention on TPU with the Pallas splash-attention kernel and structured masks.

Same contract as `kalm_jax.model.attention.dispatch.attention` (q [B, T, N, D], k/v [B, S, K, D], a `masks.Mask`
or a bool array broadcastable to [B, T, S] -> [B, T, N, D]); `dispatch.attention` dispatches here when the program is
lowered for TPU (including AOT lowering for a TPU topology on a CPU host).

A `masks.Mask` reaches the kernel without ever being materialised per batch row:
* its static pattern [T, S] becomes the kernel's static mask, from which the library derives block-sparsity
  metadata at trace time (key blocks the pattern hides are never loaded nor computed): `FullMask` when there
  is no pattern, the library's `LocalMask` / `CausalMask` when the pattern is a band (the encoder's sliding
  window, the decoder's causal self-attention; computed inside the kernel), else a `NumpyMask`;
* the key padding [B, S] and the query padding [B, T] become segment ids (real 1, padding 0): a real query
  sees only real keys, a padding query only padding keys. Nothing of size B·T·S exists in HBM.

The query heads: `make_splash_mha` in its GQA form (N query heads over K kv heads, K/V not repeated),
vmapped over the batch. When T is not a multiple of the 128-row block and the padding would waste a large
share of the rows (the decoder's 64-token prompts), the G = N/K query heads of a KV head are folded into
the query axis instead (q -> [B, K, G·T, D], the pattern and the query segment ids tiled G times), as the
rows of one head. Lengths are padded to the kernel's blocks (padded keys get segment 0; padded query rows
get segment 0 and an all-true pattern row, and are dropped).

No NaN: the kernel gives a row that visits no key block 0/0. Every padded row sees every key block, and a
pattern row with no key at all is refused (`ValueError`), so every row visits at least one block; a row
whose visible keys are all masked by the segment ids (a padding query without padding keys in reach) then
averages its visited keys' values uniformly, finite, as the einsum path does for fully masked rows.

Dense boolean masks (the scoring layer's single query row, [B, 1, S]) take the einsum path
(`xla.xla_attention`): its scores are B·N·1·S, tiny.
"""

from __future__ import annotations

import hashlib

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as _sk
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as _sm
from jax.sharding import PartitionSpec as P

from kalm_jax.model.attention import banded, masks, xla
from kalm_jax.parallel.mesh import kernel_batch_axes

_LANES = 128  # lengths are padded to multiples of this; segment ids need blocks of multiples of it
_MAX_BLOCK = 512

# Static masks by pattern content and padded shape: the layer scan traces every layer of a period, and the
# TPU branch of the platform dispatch is traced on every backend.
_MASKS: dict[tuple, _sm.Mask] = {}


def flash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask,
    scale: float,
    softcap: float | None = None,
    *,
    interpret: bool = False,
) -> jax.Array:
    """Splash attention with the `dispatch.attention` signature (see module docstring).

    q [B, T, N, D], k/v [B, S, K, D], `mask` a `masks.Mask` (keys [B, S], static pattern [T, S] or None,
    queries [B, T] or None) or a bool array broadcastable to [B, T, S] -> [B, T, N, D] in q's dtype.
    Scores, softmax and accumulation run in fp32 inside the kernel. Outputs at padding queries are
    finite but not the einsum path's (such a row attends padding keys); they are never read.
    `interpret`: run the kernel in Pallas interpret mode (any backend; the tests on CPU use it; the model
    sets it from `ModelOptions.pallas_interpret`). The TPU interpret mode (`pltpu.force_tpu_interpret_mode`)
    cannot run the kernel vmapped over the batch.

    Mosaic kernels are not partitioned by XLA: under a mesh context (`jax.set_mesh(mesh)`), the kernel
    runs per shard in a `shard_map` over the batch axes (`data`, `fsdp`, those that divide the batch) and
    over `tensor` on the heads when it divides both the query and the kv heads; other mesh axes see the
    full batch slice and all heads.
    """
    if softcap is not None:
        raise NotImplementedError(
            "attention logit soft-capping is not wired to the TPU splash kernel; "
            "build the model with ModelOptions(tpu_attention='xla') (kalm_jax.model.options)"
        )
    b, t = q.shape[:2]
    s = k.shape[1]
    if not isinstance(mask, masks.Mask):  # dense: the single scoring row, B·N·1·S scores
        return xla.xla_attention(q, k, v, jnp.broadcast_to(mask, (b, t, s)), scale)
    pattern = None if mask.pattern is None else np.asarray(mask.pattern, bool)
    if pattern is not None:
        if pattern.shape != (t, s):
            raise ValueError(f"Mask.pattern shape {pattern.shape} does not match queries x keys {(t, s)}")
        if pattern.all():
            pattern = None
        else:
            empty = np.flatnonzero(~pattern.any(axis=1))
            if empty.size:
                raise ValueError(
                    f"Mask.pattern rows {empty[:10].tolist()} see no key: the splash kernel would divide by zero there"
                )
    keys = jnp.broadcast_to(jnp.asarray(mask.keys).astype(bool), (b, s))
    queries = (
        jnp.ones((b, t), bool)
        if mask.queries is None
        else jnp.broadcast_to(jnp.asarray(mask.queries).astype(bool), (b, t))
    )

    def local(q, k, v, keys, queries):
        return _splash(q, k, v, keys, queries, pattern, float(scale), interpret)

    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return local(q, k, v, keys, queries)
    axes = kernel_batch_axes(mesh, b)
    spec = P(axes if axes else None)
    # heads split over "tensor" (the inference engine's tensor layout) stay split: each shard runs its heads
    t = mesh.shape["tensor"] if "tensor" in mesh.axis_names else 1
    heads = "tensor" if t > 1 and q.shape[2] % t == 0 and k.shape[2] % t == 0 else None
    qkv = P(axes if axes else None, None, heads, None)
    fn = jax.shard_map(local, mesh=mesh, in_specs=(qkv, qkv, qkv, spec, spec), out_specs=qkv, check_vma=False)
    return fn(q, k, v, keys, queries)


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def block_size(n: int) -> int:
    """The kernel's block along a padded length n: the largest of (512, 256, 128) that divides it."""
    return next(bl for bl in (_MAX_BLOCK, 256, _LANES) if n % bl == 0)


def fold_heads(t: int, g: int) -> bool:
    """Whether the G query heads of a KV head run as one row axis of G·T rows (less padding to 128)."""
    return g > 1 and g * _round_up(t, _LANES) > _round_up(g * t, _LANES)


def _digest(pattern: np.ndarray) -> bytes:
    return hashlib.blake2b(np.packbits(pattern).tobytes(), digest_size=16).digest()


def static_mask(pattern: np.ndarray | None, rows: int, cols: int, fold: int = 1) -> _sm.Mask:
    """The kernel's static mask [rows, cols] (padded lengths) for a pattern [T, S] (None = every key),
    its rows tiled `fold` times when heads are folded into the query axis.

    Padded rows see every key (no row may visit zero key blocks); padded keys are hidden from real rows
    by their segment id, and by the pattern in the `NumpyMask` case. A band on unfolded queries (the
    padded square extends it along the diagonal, which keeps padded rows non-empty) is a `LocalMask`, or
    a `CausalMask` when it has no right side and reaches the first key.
    """
    if pattern is None:
        return _sm.FullMask((rows, cols))
    key = (pattern.shape, _digest(pattern), rows, cols, fold)
    if key not in _MASKS:
        if len(_MASKS) >= 64:  # bounded: a NumpyMask holds rows x cols bools
            _MASKS.clear()
        _MASKS[key] = _build_static_mask(pattern, rows, cols, fold)
    return _MASKS[key]


def _build_static_mask(pattern: np.ndarray, rows: int, cols: int, fold: int) -> _sm.Mask:
    t, s = pattern.shape
    # A square band with the diagonal in it (every row non-empty): the library's LocalMask / CausalMask.
    band = banded.band_limits(pattern) if fold == 1 and rows == cols and t == s else None
    if band is not None and band[0] <= 0 <= band[1]:
        left, right = -band[0], band[1]
        if right == 0 and left >= t - 1:
            return _sm.CausalMask((rows, cols))
        return _sm.LocalMask((rows, cols), (left, right), offset=0)
    dense = np.zeros((rows, cols), bool)
    dense[: fold * t, :s] = np.tile(pattern, (fold, 1))
    dense[fold * t :] = True
    return _sm.NumpyMask(dense)


def _splash(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    keys: jax.Array,
    queries: jax.Array,
    pattern: np.ndarray | None,
    scale: float,
    interpret: bool = False,
) -> jax.Array:
    """One shard: q [B, T, N, D], k/v [B, S, K, D], keys [B, S] bool, queries [B, T] bool -> [B, T, N, D]."""
    b, t, n, d = q.shape
    s, kh = k.shape[1], k.shape[2]
    g = n // kh
    fold = g if fold_heads(t, g) else 1
    heads, rows = n // fold, fold * t
    qs = (q * jnp.asarray(scale, q.dtype)).transpose(0, 2, 1, 3)  # [B, N, T, D]; the kernel takes no scale
    if fold > 1:  # [B, K·G, T, D] -> [B, K, G·T, D]
        qs = qs.reshape(b, heads, rows, d)
        queries = jnp.tile(queries, (1, fold))
    rp, sp = _round_up(rows, _LANES), _round_up(s, _LANES)
    qs = jnp.pad(qs, ((0, 0), (0, 0), (0, rp - rows), (0, 0)))
    kf = jnp.pad(k.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, sp - s), (0, 0)))  # [B, K, Sp, D]
    vf = jnp.pad(v.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, sp - s), (0, 0)))
    q_seg = jnp.pad(queries.astype(jnp.int32), ((0, 0), (0, rp - rows)))
    kv_seg = jnp.pad(keys.astype(jnp.int32), ((0, 0), (0, sp - s)))

    bq, bkv = block_size(rp), block_size(sp)
    blocks = _sk.BlockSizes(
        block_q=bq,
        block_kv=bkv,
        block_kv_compute=bkv,
        block_q_dkv=bq,
        block_kv_dkv=bkv,
        block_kv_dkv_compute=bkv,
        block_q_dq=bq,
        block_kv_dq=bkv,
    )
    # Built per trace: its metadata arrays are staged into the trace (an eager build would run on the
    # lowering's mesh, which for AOT is a compile-only TPU topology).
    kernel = _sk.make_splash_mha(
        _sm.MultiHeadMask([static_mask(pattern, rp, sp, fold)] * heads),
        block_sizes=blocks,
        head_shards=1,
        q_seq_shards=1,
        interpret=interpret,
    )

    def row(q, k, v, qs_, ks_):
        return kernel(q, k, v, segment_ids=_sk.SegmentIds(q=qs_, kv=ks_))

    out = jax.vmap(row)(qs, kf, vf, q_seg, kv_seg)[:, :, :rows]  # [B, heads, rows, D]
    out = out.reshape(b, n, t, d).transpose(0, 2, 1, 3)
    return out.astype(q.dtype)


__all__ = ["block_size", "flash_attention", "fold_heads", "static_mask"]
