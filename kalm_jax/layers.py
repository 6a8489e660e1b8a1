"""Pure functions for the T5Gemma 2 blocks: Gemma RMSNorm, half-split RoPE, masks, GQA attention, GeGLU.

Shape letters: B batch, T query length, S key length, H hidden, N query heads, K kv heads, G = N/K,
D head dim, I MLP width.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from kalm_jax.config import ModelConfig

_NEG = float(np.finfo(np.float32).min)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """Gemma RMSNorm over the last axis: x·rsqrt(mean x² + eps)·(1 + w), in fp32, cast back to x.dtype."""
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (y * (1.0 + weight.astype(jnp.float32))).astype(x.dtype)


def rope_table(length: int, head_dim: int, theta: float, factor: float) -> tuple[jax.Array, jax.Array]:
    """cos, sin [length, D] in fp32 for positions 0..length-1; linear scaling divides inv_freq by `factor`."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    inv_freq = inv_freq / factor
    angles = jnp.arange(length, dtype=jnp.float32)[:, None] * inv_freq[None, :]
    emb = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Half-split (NeoX) rotation of x [B, T, heads, D] with cos/sin [T, D] (or per row [B, T, D]),
    cast to x.dtype."""
    if cos.ndim == 2:
        cos, sin = cos[None], sin[None]
    cos = cos.astype(x.dtype)[:, :, None, :]
    sin = sin.astype(x.dtype)[:, :, None, :]
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


def encoder_window(length: int, window: int) -> np.ndarray:
    """Bidirectional sliding-window pattern (bool [S, S], no batch axis, a compile-time constant).

    Key j is visible from query i when 0 <= i-j < (W+1)//2 or 0 < j-i < W//2 + 1 (W keys in all).
    """
    dist = np.arange(length)[:, None] - np.arange(length)[None, :]
    return ((dist >= 0) & (dist < (window + 1) // 2)) | ((dist < 0) & (-dist < window // 2 + 1))


def causal_window(length: int, window: int | None = None) -> np.ndarray:
    """Causal pattern (bool [T, T]): key j <= query i, and i - j < W when `window` is given."""
    i = np.arange(length)[:, None]
    j = np.arange(length)[None, :]
    ok = j <= i
    return ok & ((i - j) < window) if window is not None else ok


def layer_mask(key_mask: jax.Array, pattern_full: np.ndarray | None, pattern_sliding: np.ndarray,
               sliding) -> jax.Array:
    """The attention mask of one layer, bool broadcastable to [B, T, S]: the key padding mask [B, S]
    ANDed with the layer type's [T, S] pattern (`pattern_full` None = every key).

    Nothing of size B·T·S is built ahead: the padding mask and the pattern are combined per layer, as an
    expression XLA fuses into the score masking (`sliding` may be a traced bool inside a layer scan).
    """
    keys = key_mask.astype(bool)[:, None, :]
    if isinstance(sliding, (bool, np.bool_)):
        pattern = pattern_sliding if sliding else pattern_full
    else:
        full = np.ones_like(pattern_sliding) if pattern_full is None else pattern_full
        pattern = jnp.where(sliding, pattern_sliding, full)
    return keys if pattern is None else keys & jnp.asarray(pattern)[None]


ATTENTION_IMPLS = ("auto", "xla", "dot_product", "cudnn", "tpu_flash")

# Attention kernel used by "auto" when a program is lowered for TPU: "flash" (Pallas TPU kernel,
# kalm_jax/tpu_attention.py) or "xla" (the einsum reference, as on CPU).
TPU_ATTENTION_IMPL = "flash"


def resolve_attention_impl(impl: str, dtype, head_dim: int, softcap: float | None = None) -> str:
    """The concrete attention implementation for `impl`.

    "xla" is the einsum reference (the parity-tested numerics); "dot_product" is
    `jax.nn.dot_product_attention` with XLA; "cudnn" is its cuDNN flash kernel (GPU, bf16, head_dim <= 256);
    "tpu_flash" is the Pallas TPU kernel. "auto" resolves to "cudnn" on a GPU backend in bf16, else to
    "platform": the TPU kernel when the program is lowered for TPU (also AOT from a CPU host, via
    `jax.lax.platform_dependent`) and "xla" everywhere else. Logit soft-capping needs "xla".
    """
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"unknown attention implementation {impl!r}; valid: {list(ATTENTION_IMPLS)}")
    if impl == "auto":
        if softcap is not None:
            return "xla"
        on_gpu = jax.default_backend() in ("gpu", "cuda", "rocm")
        flash_ok = jnp.dtype(dtype) == jnp.bfloat16 and head_dim % 8 == 0 and head_dim <= 256
        if on_gpu and flash_ok:
            return "cudnn"
        return "platform" if TPU_ATTENTION_IMPL == "flash" else "xla"
    if impl != "xla" and softcap is not None:
        raise ValueError(f"attention implementation {impl!r} does not support attn_logit_softcapping; use 'xla'")
    return impl


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float,
              softcap: float | None = None, impl: str = "xla") -> jax.Array:
    """Grouped-query softmax attention, q [B, T, N, D], k/v [B, S, K, D], mask bool [B, T, S] -> [B, T, N, D].

    `impl` picks the kernel (see `resolve_attention_impl`). The fused kernels take the mask once per batch
    row ([B, 1, T, S], broadcast over heads), never per head.
    """
    impl = resolve_attention_impl(impl, q.dtype, q.shape[-1], softcap)
    if impl in ("dot_product", "cudnn"):
        return jax.nn.dot_product_attention(
            q, k, v, mask=mask[:, None], scale=scale,
            implementation="cudnn" if impl == "cudnn" else "xla").astype(q.dtype)
    if impl in ("tpu_flash", "platform"):
        from kalm_jax import tpu_attention

        def tpu(q, k, v, mask):
            return tpu_attention.flash_attention(q, k, v, mask, scale)

        if impl == "tpu_flash":
            return tpu(q, k, v, mask)

        def default(q, k, v, mask):
            return xla_attention(q, k, v, mask, scale)

        return jax.lax.platform_dependent(q, k, v, mask, tpu=tpu, default=default)
    return xla_attention(q, k, v, mask, scale, softcap)


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float,
                  softcap: float | None = None) -> jax.Array:
    """Grouped-query softmax attention in plain XLA (einsums).

    q [B, T, N, D], k/v [B, S, K, D], mask bool [B, T, S] -> [B, T, N, D]. Scores and softmax in fp32.
    Fully masked rows give a uniform average (as HF's additive finfo.min mask does).
    """
    b, t, n, d = q.shape
    kh = k.shape[2]
    qg = q.reshape(b, t, kh, n // kh, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
    if softcap is not None:
        scores = jnp.tanh(scores / softcap) * softcap
    scores = jnp.where(mask[:, None, None, :, :], scores, _NEG)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(b, t, n, d)


def merged_attention(q: jax.Array, ks: jax.Array, vs: jax.Array, self_mask: jax.Array, kc: jax.Array,
                     vc: jax.Array, cross_mask: jax.Array, scale: float, impl: str = "xla") -> jax.Array:
    """One softmax over two key sets: self keys ks/vs [B, T', K, D] under `self_mask` (bool, broadcastable
    to [B, T, T']) and cross keys kc/vc [B, S, K, D] under `cross_mask` (broadcastable to [B, T, S]).

    The einsum path never concatenates K/V or the masks: scores of both parts share one max and one
    normaliser, and the two weighted sums add in fp32. The fused kernels get the concatenation.
    """
    impl = resolve_attention_impl(impl, q.dtype, q.shape[-1])
    b, t = q.shape[:2]

    def fused(q, ks, vs, self_mask, kc, vc, cross_mask, kernel_impl):
        mask = jnp.concatenate([jnp.broadcast_to(self_mask, (b, t, ks.shape[1])),
                                jnp.broadcast_to(cross_mask, (b, t, kc.shape[1]))], axis=-1)
        return attention(q, jnp.concatenate([ks, kc], axis=1), jnp.concatenate([vs, vc], axis=1), mask, scale,
                         impl=kernel_impl)

    if impl in ("dot_product", "cudnn", "tpu_flash"):
        return fused(q, ks, vs, self_mask, kc, vc, cross_mask, impl)
    if impl == "platform":
        return jax.lax.platform_dependent(
            q, ks, vs, self_mask, kc, vc, cross_mask,
            tpu=lambda *a: fused(*a, "tpu_flash"),
            default=lambda *a: xla_merged_attention(*a, scale))
    return xla_merged_attention(q, ks, vs, self_mask, kc, vc, cross_mask, scale)


def xla_merged_attention(q, ks, vs, self_mask, kc, vc, cross_mask, scale: float) -> jax.Array:
    """Einsum form of `merged_attention` (fp32 scores and softmax; fully masked rows: uniform average)."""
    b, t, n, d = q.shape
    kh = ks.shape[2]
    qg = q.reshape(b, t, kh, n // kh, d)

    def scores(k, mask):
        sc = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
        return jnp.where(mask[:, None, None, :, :], sc, _NEG)

    s1, s2 = scores(ks, self_mask), scores(kc, cross_mask)
    m = jax.lax.stop_gradient(jnp.maximum(s1.max(-1, keepdims=True), s2.max(-1, keepdims=True)))
    e1, e2 = jnp.exp(s1 - m), jnp.exp(s2 - m)
    z = e1.sum(-1, keepdims=True) + e2.sum(-1, keepdims=True)
    out = (jnp.einsum("bkgts,bskd->btkgd", (e1 / z).astype(vs.dtype), vs, preferred_element_type=jnp.float32)
           + jnp.einsum("bkgts,bskd->btkgd", (e2 / z).astype(vc.dtype), vc, preferred_element_type=jnp.float32))
    return out.astype(q.dtype).reshape(b, t, n, d)


def gelu_tanh(x: jax.Array) -> jax.Array:
    return jax.nn.gelu(x, approximate=True)


def mlp(x: jax.Array, gate: jax.Array, up: jax.Array, down: jax.Array) -> jax.Array:
    """GeGLU: down(gelu_tanh(x @ gate) * (x @ up)); x [B, T, H], gate/up [H, I], down [I, H]."""
    g = jnp.einsum("bth,hi->bti", x, gate)
    u = jnp.einsum("bth,hi->bti", x, up)
    return jnp.einsum("bti,ih->bth", gelu_tanh(g) * u, down)


def self_attention_block(x, w, mask, cos, sin, cfg: ModelConfig, impl: str = "xla"):
    """Encoder attention sub-block (pre-norm → attention → post-norm); returns the residual update [B,T,H]."""
    h = rms_norm(x, w["pre_attn_norm"], cfg.rms_norm_eps)
    q = rms_norm(jnp.einsum("bth,hnd->btnd", h, w["q"]), w["q_norm"], cfg.rms_norm_eps)
    k = rms_norm(jnp.einsum("bth,hkd->btkd", h, w["k"]), w["k_norm"], cfg.rms_norm_eps)
    v = jnp.einsum("bth,hkd->btkd", h, w["v"])
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    o = attention(q, k, v, mask, cfg.attn_scale, impl=impl)
    o = jnp.einsum("btnd,ndh->bth", o, w["o"])
    return rms_norm(o, w["post_attn_norm"], cfg.rms_norm_eps)


def merged_attention_block(x, enc, w, self_mask, cross_mask, cos, sin, cfg: ModelConfig, impl: str = "xla",
                           query_index: jax.Array | None = None):
    """Decoder merged attention: one softmax over [self keys (RoPE) ; passage keys (k_norm, no RoPE)].

    x [B, T, H] decoder stream, enc [B, S, H] passage states, self_mask bool broadcastable to [B, T, T],
    cross_mask bool broadcastable to [B, T, S]. With `query_index` [B] (int), only that position of each
    row is a query (keys and values still come from every position): returns [B, 1, H] instead of [B, T, H].
    """
    h = rms_norm(x, w["pre_attn_norm"], cfg.rms_norm_eps)
    ks = rms_norm(jnp.einsum("bth,hkd->btkd", h, w["k"]), w["k_norm"], cfg.rms_norm_eps)
    vs = jnp.einsum("bth,hkd->btkd", h, w["v"])
    ks = apply_rope(ks, cos, sin)
    if query_index is not None:
        h = jnp.take_along_axis(h, query_index[:, None, None], axis=1)  # [B, 1, H]
        cos, sin = cos[query_index][:, None], sin[query_index][:, None]  # [B, 1, D]
        self_mask = jnp.take_along_axis(jnp.broadcast_to(self_mask, (x.shape[0],) + self_mask.shape[1:]),
                                        query_index[:, None, None], axis=1)
    q = rms_norm(jnp.einsum("bth,hnd->btnd", h, w["q"]), w["q_norm"], cfg.rms_norm_eps)
    q = apply_rope(q, cos, sin)
    kc = rms_norm(jnp.einsum("bsh,hkd->bskd", enc, w["k"]), w["k_norm"], cfg.rms_norm_eps)
    vc = jnp.einsum("bsh,hkd->bskd", enc, w["v"])
    o = merged_attention(q, ks, vs, self_mask, kc, vc, cross_mask, cfg.attn_scale, impl=impl)
    o = jnp.einsum("btnd,ndh->bth", o, w["o"])
    return rms_norm(o, w["post_attn_norm"], cfg.rms_norm_eps)


def mlp_block(x, w, cfg: ModelConfig):
    h = rms_norm(x, w["pre_ffw_norm"], cfg.rms_norm_eps)
    h = mlp(h, w["gate"], w["up"], w["down"])
    return rms_norm(h, w["post_ffw_norm"], cfg.rms_norm_eps)
