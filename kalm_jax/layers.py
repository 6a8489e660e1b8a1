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
    """Half-split (NeoX) rotation of x [B, T, heads, D] with cos/sin [T, D] cast to x.dtype."""
    cos = cos.astype(x.dtype)[None, :, None, :]
    sin = sin.astype(x.dtype)[None, :, None, :]
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


def encoder_masks(mask: jax.Array, window: int) -> tuple[jax.Array, jax.Array]:
    """Bidirectional encoder masks (bool [B, S, S]) for full and sliding layers.

    Sliding: key j is visible from query i when 0 <= i-j < (W+1)//2 or 0 < j-i < W//2 + 1 (W keys in all).
    """
    keys = mask.astype(bool)[:, None, :]
    s = mask.shape[1]
    dist = jnp.arange(s)[:, None] - jnp.arange(s)[None, :]
    window_ok = ((dist >= 0) & (dist < (window + 1) // 2)) | ((dist < 0) & (-dist < window // 2 + 1))
    full = jnp.broadcast_to(keys, (mask.shape[0], s, s))
    return full, full & window_ok[None]


def decoder_masks(dec_mask: jax.Array, enc_mask: jax.Array, window: int) -> tuple[jax.Array, jax.Array]:
    """Merged-attention masks (bool [B, T, T+S]) for full and sliding decoder layers.

    Self part: causal (sliding layers also need i - j < W), ANDed with the decoder padding mask on keys.
    Cross part: the passage mask, on every layer type, never windowed.
    """
    b, t = dec_mask.shape
    i = jnp.arange(t)[:, None]
    j = jnp.arange(t)[None, :]
    causal = (j <= i)[None] & dec_mask.astype(bool)[:, None, :]
    sliding = causal & ((i - j) < window)[None]
    cross = jnp.broadcast_to(enc_mask.astype(bool)[:, None, :], (b, t, enc_mask.shape[1]))
    return jnp.concatenate([causal, cross], axis=-1), jnp.concatenate([sliding, cross], axis=-1)


ATTENTION_IMPLS = ("auto", "xla", "dot_product", "cudnn")


def resolve_attention_impl(impl: str, dtype, head_dim: int, softcap: float | None = None) -> str:
    """The concrete attention implementation for `impl` ("auto" -> "cudnn" on GPU for bf16, else "xla").

    "xla" is the einsum reference (the CPU/TPU default, bit-for-bit the parity-tested numerics);
    "dot_product" is `jax.nn.dot_product_attention` with XLA; "cudnn" is its cuDNN flash kernel (GPU, bf16,
    head_dim <= 256 on Hopper). Attention logit soft-capping is only supported by "xla".
    """
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"unknown attention implementation {impl!r}; valid: {list(ATTENTION_IMPLS)}")
    if impl == "auto":
        on_gpu = jax.default_backend() in ("gpu", "cuda", "rocm")
        flash_ok = jnp.dtype(dtype) == jnp.bfloat16 and head_dim % 8 == 0 and head_dim <= 256
        impl = "cudnn" if on_gpu and flash_ok and softcap is None else "xla"
    if impl != "xla" and softcap is not None:
        raise ValueError(f"attention implementation {impl!r} does not support attn_logit_softcapping; use 'xla'")
    return impl


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float,
              softcap: float | None = None, impl: str = "xla") -> jax.Array:
    """Grouped-query softmax attention.

    q [B, T, N, D], k/v [B, S, K, D], mask bool [B, T, S] -> [B, T, N, D]. Scores and softmax in fp32.
    Fully masked rows give a uniform average (as HF's additive finfo.min mask does) with "xla".
    `impl` picks the kernel (see `resolve_attention_impl`; "auto" is resolved here). The fused kernels
    take the mask once per batch row ([B, 1, T, S], broadcast over heads), never per head.
    """
    impl = resolve_attention_impl(impl, q.dtype, q.shape[-1], softcap)
    if impl != "xla":
        return jax.nn.dot_product_attention(
            q, k, v, mask=mask[:, None], scale=scale,
            implementation="cudnn" if impl == "cudnn" else "xla").astype(q.dtype)
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


def merged_attention_block(x, enc, w, mask, cos, sin, cfg: ModelConfig, impl: str = "xla"):
    """Decoder merged attention: one softmax over [self keys (RoPE) ; passage keys (k_norm, no RoPE)].

    x [B, T, H] decoder stream, enc [B, S, H] passage states, mask bool [B, T, T+S].
    """
    h = rms_norm(x, w["pre_attn_norm"], cfg.rms_norm_eps)
    q = rms_norm(jnp.einsum("bth,hnd->btnd", h, w["q"]), w["q_norm"], cfg.rms_norm_eps)
    ks = rms_norm(jnp.einsum("bth,hkd->btkd", h, w["k"]), w["k_norm"], cfg.rms_norm_eps)
    vs = jnp.einsum("bth,hkd->btkd", h, w["v"])
    q, ks = apply_rope(q, cos, sin), apply_rope(ks, cos, sin)
    kc = rms_norm(jnp.einsum("bsh,hkd->bskd", enc, w["k"]), w["k_norm"], cfg.rms_norm_eps)
    vc = jnp.einsum("bsh,hkd->bskd", enc, w["v"])
    o = attention(q, jnp.concatenate([ks, kc], axis=1), jnp.concatenate([vs, vc], axis=1), mask, cfg.attn_scale,
                  impl=impl)
    o = jnp.einsum("btnd,ndh->bth", o, w["o"])
    return rms_norm(o, w["post_attn_norm"], cfg.rms_norm_eps)


def mlp_block(x, w, cfg: ModelConfig):
    h = rms_norm(x, w["pre_ffw_norm"], cfg.rms_norm_eps)
    h = mlp(h, w["gate"], w["up"], w["down"])
    return rms_norm(h, w["post_ffw_norm"], cfg.rms_norm_eps)
