"""The attention entry points the model calls: `attention` and `merged_attention` pick a kernel (the XLA
einsum reference, `jax.nn.dot_product_attention`, cuDNN flash, the Pallas splash kernel on TPU) and compute
banded (sliding-window) masks block-wise.

Shape letters: B batch, T query length, S key length, N query heads, K kv heads, D head dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from kalm_jax.model.attention.banded import BandBlocking, band_blocking
from kalm_jax.model.attention.masks import Mask, concat_masks, dense_mask
from kalm_jax.model.attention.xla import xla_attention, xla_merged_attention

ATTENTION_IMPLS = ("auto", "xla", "dot_product", "cudnn", "tpu_flash")

# What "auto" may use when a program is lowered for TPU (`tpu=`; `ModelOptions.tpu_attention`): "flash" (the
# Pallas TPU kernel, kalm_jax/model/attention/splash.py) or "xla" (the einsum reference, as on CPU).
TPU_ATTENTION_IMPLS = ("flash", "xla")


def resolve_attention_impl(impl: str, dtype, head_dim: int, softcap: float | None = None, *, tpu: str = "flash") -> str:
    """The concrete attention implementation for `impl`.

    "xla" is the einsum reference (the parity-tested numerics); "dot_product" is
    `jax.nn.dot_product_attention` with XLA; "cudnn" is its cuDNN flash kernel (GPU, bf16, head_dim <= 256);
    "tpu_flash" is the Pallas TPU kernel. "auto" resolves to "cudnn" on a GPU backend in bf16, else (with
    `tpu` = "flash") to "platform": the TPU kernel when the program is lowered for TPU (also AOT from a CPU
    host, via `jax.lax.platform_dependent`) and "xla" everywhere else; with `tpu` = "xla", to "xla". Logit
    soft-capping needs "xla".
    """
    if tpu not in TPU_ATTENTION_IMPLS:
        raise ValueError(f"tpu={tpu!r}; valid: {list(TPU_ATTENTION_IMPLS)}")
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"unknown attention implementation {impl!r}; valid: {list(ATTENTION_IMPLS)}")
    if impl == "auto":
        if softcap is not None:
            return "xla"
        on_gpu = jax.default_backend() in ("gpu", "cuda", "rocm")
        flash_ok = jnp.dtype(dtype) == jnp.bfloat16 and head_dim % 8 == 0 and head_dim <= 256
        if on_gpu and flash_ok:
            return "cudnn"
        return "platform" if tpu == "flash" else "xla"
    if impl != "xla" and softcap is not None:
        raise ValueError(f"attention implementation {impl!r} does not support attn_logit_softcapping; use 'xla'")
    return impl


def scores_stay_on_chip(impl: str, dtype, head_dim: int, softcap: float | None, *, tpu: str, platform: str) -> bool:
    """Whether attention `impl` (`resolve_attention_impl`) in a program for `platform` devices ("tpu", "gpu",
    "cpu") runs a fused kernel that never writes its [queries, keys] scores to device memory: the TPU splash
    kernel or cuDNN flash attention. The einsum paths ("xla", "dot_product") write them."""
    resolved = resolve_attention_impl(impl, dtype, head_dim, softcap, tpu=tpu)
    if resolved == "platform":
        return platform == "tpu"
    return resolved in ("tpu_flash", "cudnn")


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: Mask | jax.Array,
    scale: float,
    softcap: float | None = None,
    impl: str = "xla",
    *,
    tpu: str = "flash",
    interpret: bool = False,
) -> jax.Array:
    """Grouped-query softmax attention, q [B, T, N, D], k/v [B, S, K, D] -> [B, T, N, D].

    `mask`: a structured `Mask` (key padding [B, S] + static pattern [T, S]) or a boolean array
    broadcastable to [B, T, S]. `impl` and `tpu` pick the kernel (see `resolve_attention_impl`); `interpret`
    runs the TPU kernel in Pallas interpret mode (`splash.flash_attention`). The fused kernels take the mask
    once per batch row ([B, 1, T, S], broadcast over heads), never per head.

    A `Mask` whose static pattern is a band (a sliding window: `band_limits`) is computed block-wise when
    that skips keys (`band_blocking`): each block of C queries attends only the keys its band touches,
    with the same kernel (see `banded_attention`). Every query with at least one visible key gets the
    dense result up to fp32 rounding; a query that sees no key at all (only possible at a padding query
    in the model) averages its block's keys instead of all keys.
    """
    impl = resolve_attention_impl(impl, q.dtype, q.shape[-1], softcap, tpu=tpu)
    blocking = band_blocking(mask, q.shape[1], k.shape[1]) if isinstance(mask, Mask) else None
    if blocking is not None:
        return banded_attention(q, k, v, mask, blocking, scale, softcap, impl, interpret=interpret)
    return _attention_kernel(q, k, v, mask, scale, softcap, impl, interpret)


def _attention_kernel(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: Mask | jax.Array,
    scale: float,
    softcap: float | None,
    impl: str,
    interpret: bool = False,
) -> jax.Array:
    """`attention` with a resolved `impl`, over all T x S query-key pairs (no blocking)."""
    if impl in ("dot_product", "cudnn"):
        dense = jnp.broadcast_to(dense_mask(mask), (q.shape[0], q.shape[1], k.shape[1]))
        return jax.nn.dot_product_attention(
            q, k, v, mask=dense[:, None], scale=scale, implementation="cudnn" if impl == "cudnn" else "xla"
        ).astype(q.dtype)
    if impl in ("tpu_flash", "platform"):
        from kalm_jax.model.attention import splash

        def tpu(q, k, v):
            return splash.flash_attention(q, k, v, mask, scale, interpret=interpret)

        if impl == "tpu_flash":
            return tpu(q, k, v)

        def default(q, k, v):
            return xla_attention(q, k, v, dense_mask(mask), scale)

        return jax.lax.platform_dependent(q, k, v, tpu=tpu, default=default)
    return xla_attention(q, k, v, dense_mask(mask), scale, softcap)


def _window(x: jax.Array, start: int, length: int) -> jax.Array:
    """x[:, start:start + length] of x [B, S, ...], zero (False) where the index falls outside [0, S)."""
    pads = [(0, 0, 0), (-start, start + length - x.shape[1], 0)] + [(0, 0, 0)] * (x.ndim - 2)
    return jax.lax.pad(x, jnp.zeros((), x.dtype), pads)


def banded_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: Mask,
    blocking: BandBlocking,
    scale: float,
    softcap: float | None = None,
    impl: str = "xla",
    *,
    interpret: bool = False,
) -> jax.Array:
    """`attention` under a band mask, block-wise: q [B, T, N, D], k/v [B, S, K, D] -> [B, T, N, D].

    With C = blocking.block, Kb = blocking.span and nb = ceil(T / C): the queries (zero-padded to nb·C)
    become nb blocks of C, and block b gets the keys C·b + lo ... C·b + lo + Kb - 1 (the union of its
    queries' bands), cut from the keys as Kb/C shifted copies of the key blocks, concatenated (static
    slices, no gather). The kernel then runs on the batch [B·nb, C, N, D] x [B·nb, Kb, K, D] under
    Mask(key padding of those keys [B·nb, Kb] (keys outside [0, S) are padding), the static band
    0 <= jj - i <= hi - lo [C, Kb] (the same for every block), query padding [B·nb, C]); the padded
    queries are dropped after.
    """
    b, t, n, d = q.shape
    lo, hi, c, kb = blocking
    nb, nk = -(-t // c), kb // c

    def key_blocks(x: jax.Array) -> jax.Array:  # [B, S, ...] -> [B·nb, Kb, ...]
        x = _window(x, lo, (nb + nk - 1) * c)
        x = x.reshape(b, nb + nk - 1, c, *x.shape[2:])
        x = jnp.concatenate([x[:, o : o + nb] for o in range(nk)], axis=2)  # [B, nb, Kb, ...]
        return x.reshape(b * nb, kb, *x.shape[3:])

    def query_blocks(x: jax.Array) -> jax.Array:  # [B, T, ...] -> [B·nb, C, ...]
        return _window(x, 0, nb * c).reshape(b * nb, c, *x.shape[2:])

    queries = mask.queries
    if queries is None and nb * c != t:
        queries = jnp.ones((b, t), bool)
    rel = np.arange(kb)[None, :] - np.arange(c)[:, None]  # [C, Kb]: jj - i
    blocked = Mask(
        key_blocks(jnp.asarray(mask.keys).astype(bool)),
        (rel >= 0) & (rel <= hi - lo),
        None if queries is None else query_blocks(jnp.asarray(queries).astype(bool)),
    )
    out = _attention_kernel(query_blocks(q), key_blocks(k), key_blocks(v), blocked, scale, softcap, impl, interpret)
    return out.reshape(b, nb * c, n, d)[:, :t]


def merged_attention(
    q: jax.Array,
    ks: jax.Array,
    vs: jax.Array,
    self_mask: Mask | jax.Array,
    kc: jax.Array,
    vc: jax.Array,
    cross_mask: Mask | jax.Array,
    scale: float,
    impl: str = "xla",
    *,
    tpu: str = "flash",
    interpret: bool = False,
) -> jax.Array:
    """One softmax over two key sets: self keys ks/vs [B, T', K, D] under `self_mask` and cross keys
    kc/vc [B, S, K, D] under `cross_mask` (each a `Mask` or a boolean array broadcastable to [B, T, T'] /
    [B, T, S]).

    The einsum path never concatenates K/V or the masks: scores of both parts share one max and one
    normaliser, and the two weighted sums add in fp32. The fused kernels get the concatenation (a
    structured `Mask` when both masks are). `tpu`, `interpret`: as in `attention`.
    """
    impl = resolve_attention_impl(impl, q.dtype, q.shape[-1], tpu=tpu)
    t = q.shape[1]

    def fused(q, ks, vs, kc, vc, kernel_impl):
        mask = concat_masks(self_mask, cross_mask, t, ks.shape[1], kc.shape[1])
        return attention(
            q,
            jnp.concatenate([ks, kc], axis=1),
            jnp.concatenate([vs, vc], axis=1),
            mask,
            scale,
            impl=kernel_impl,
            interpret=interpret,
        )

    if impl in ("dot_product", "cudnn", "tpu_flash"):
        return fused(q, ks, vs, kc, vc, impl)

    def default(q, ks, vs, kc, vc):
        return xla_merged_attention(q, ks, vs, dense_mask(self_mask), kc, vc, dense_mask(cross_mask), scale)

    if impl == "platform":
        return jax.lax.platform_dependent(q, ks, vs, kc, vc, tpu=lambda *a: fused(*a, "tpu_flash"), default=default)
    return default(q, ks, vs, kc, vc)
