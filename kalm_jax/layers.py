"""Pure functions for the T5Gemma 2 blocks: Gemma RMSNorm, half-split RoPE, masks, GQA attention, GeGLU.

Shape letters: B batch, T query length, S key length, H hidden, N query heads, K kv heads, G = N/K,
D head dim, I MLP width.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

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
    half = x.shape[-1] // 2
    # The tables repeat their first half (rope_table), so each half of x rotates with the same cos/sin:
    # [x1, x2] -> [x1·cos - x2·sin, x2·cos + x1·sin], without building rotate_half(x).
    cos = cos[..., :half].astype(x.dtype)[:, :, None, :]
    sin = sin[..., :half].astype(x.dtype)[:, :, None, :]
    x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


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


class Mask(NamedTuple):
    """An attention mask kept in structured form, so that a kernel can see which blocks are empty.

    keys: key padding, bool or 0/1 [B, S] (true = a real key).
    pattern: static bool [T, S] (numpy: a compile-time constant) ANDed with `keys`; None = every key.
    queries: query padding, bool or 0/1 [B, T], or None (every query real). It does not change the mask:
      the output at a padding query is never read, and a kernel may use it (e.g. as segment ids) so that
      such a row attends only padding keys.
    The whole mask is `keys[:, None, :] & pattern[None]`; `dense()` builds that expression.
    """

    keys: jax.Array
    pattern: np.ndarray | None = None
    queries: jax.Array | None = None

    def dense(self) -> jax.Array:
        """bool, broadcastable to [B, T, S]: [B, 1, S] without a pattern, else [B, T, S]. Nothing of size
        B·T·S is built ahead: XLA fuses this expression into the score masking."""
        keys = self.keys.astype(bool)[:, None, :]
        return keys if self.pattern is None else keys & jnp.asarray(self.pattern)[None]


def dense_mask(mask: Mask | jax.Array) -> jax.Array:
    """A `Mask` as its dense boolean expression; a boolean array (broadcastable to [B, T, S]) as it is."""
    return mask.dense() if isinstance(mask, Mask) else mask


def concat_masks(a: Mask | jax.Array, b: Mask | jax.Array, t: int, s_a: int, s_b: int) -> Mask | jax.Array:
    """The mask of keys [a-keys ; b-keys] for t queries: structured when both are, else dense [B, t, s_a + s_b]."""
    if isinstance(a, Mask) and isinstance(b, Mask):
        pa = np.ones((t, s_a), bool) if a.pattern is None else np.broadcast_to(a.pattern, (t, s_a))
        pb = np.ones((t, s_b), bool) if b.pattern is None else np.broadcast_to(b.pattern, (t, s_b))
        pattern = np.concatenate([pa, pb], axis=1)
        keys = jnp.concatenate([a.keys.astype(bool), b.keys.astype(bool)], axis=1)
        return Mask(keys, None if pattern.all() else pattern, a.queries if a.queries is not None else b.queries)
    da, db = dense_mask(a), dense_mask(b)
    batch = max(da.shape[0], db.shape[0])
    return jnp.concatenate([jnp.broadcast_to(da, (batch, t, s_a)), jnp.broadcast_to(db, (batch, t, s_b))], axis=-1)


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


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: Mask | jax.Array,
    scale: float,
    softcap: float | None = None,
    impl: str = "xla",
) -> jax.Array:
    """Grouped-query softmax attention, q [B, T, N, D], k/v [B, S, K, D] -> [B, T, N, D].

    `mask`: a structured `Mask` (key padding [B, S] + static pattern [T, S]) or a boolean array
    broadcastable to [B, T, S]. `impl` picks the kernel (see `resolve_attention_impl`). The fused kernels
    take the mask once per batch row ([B, 1, T, S], broadcast over heads), never per head.

    A `Mask` whose static pattern is a band (a sliding window: `band_limits`) is computed block-wise when
    that skips keys (`band_blocking`): each block of C queries attends only the keys its band touches,
    with the same kernel (see `banded_attention`). Every query with at least one visible key gets the
    dense result up to fp32 rounding; a query that sees no key at all (only possible at a padding query
    in the model) averages its block's keys instead of all keys.
    """
    impl = resolve_attention_impl(impl, q.dtype, q.shape[-1], softcap)
    blocking = band_blocking(mask, q.shape[1], k.shape[1]) if isinstance(mask, Mask) else None
    if blocking is not None:
        return banded_attention(q, k, v, mask, blocking, scale, softcap, impl)
    return _attention_kernel(q, k, v, mask, scale, softcap, impl)


def _attention_kernel(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: Mask | jax.Array, scale: float, softcap: float | None, impl: str
) -> jax.Array:
    """`attention` with a resolved `impl`, over all T x S query-key pairs (no blocking)."""
    if impl in ("dot_product", "cudnn"):
        dense = jnp.broadcast_to(dense_mask(mask), (q.shape[0], q.shape[1], k.shape[1]))
        return jax.nn.dot_product_attention(
            q, k, v, mask=dense[:, None], scale=scale, implementation="cudnn" if impl == "cudnn" else "xla"
        ).astype(q.dtype)
    if impl in ("tpu_flash", "platform"):
        from kalm_jax import tpu_attention

        def tpu(q, k, v):
            return tpu_attention.flash_attention(q, k, v, mask, scale)

        if impl == "tpu_flash":
            return tpu(q, k, v)

        def default(q, k, v):
            return xla_attention(q, k, v, dense_mask(mask), scale)

        return jax.lax.platform_dependent(q, k, v, tpu=tpu, default=default)
    return xla_attention(q, k, v, dense_mask(mask), scale, softcap)


# ---------------------------------------------------------------------- banded (sliding-window) masks
# Largest query block, and how much wider than the band the keys of one block may be (C is the largest
# power of two <= _MAX_BLOCK whose key span is at most _MAX_SPAN_RATIO x the band width).
_MAX_BLOCK = 128
_MAX_SPAN_RATIO = 1.25


class BandBlocking(NamedTuple):
    """How `banded_attention` splits a band lo <= j - i <= hi: query blocks of `block` (C) queries, each
    attending `span` (Kb, a multiple of C) consecutive keys starting at key C·b + lo for block b."""

    lo: int
    hi: int
    block: int
    span: int


def band_limits(pattern: np.ndarray | None) -> tuple[int, int] | None:
    """(lo, hi) when the static pattern bool [T, S] is exactly the band lo <= j - i <= hi (query i, key j),
    else None (also for no pattern or an empty one). `encoder_window` and `causal_window` are bands.

    Row-wise, in O(T·S) boolean work: each row must be one run of keys, and the runs must start and end
    where the band (clipped to [0, S)) does."""
    if not isinstance(pattern, np.ndarray) or pattern.ndim != 2 or pattern.dtype != bool or not pattern.any():
        return None
    t, s = pattern.shape
    rows = np.arange(t)
    count = pattern.sum(axis=1)
    first = np.argmax(pattern, axis=1)
    last = s - 1 - np.argmax(pattern[:, ::-1], axis=1)
    some = count > 0
    lo, hi = int((first - rows)[some].min()), int((last - rows)[some].max())
    start, stop = np.maximum(rows + lo, 0), np.minimum(rows + hi, s - 1)  # the band's run in each row
    want = stop >= start
    ok = (
        np.array_equal(some, want)
        and np.array_equal(first[some], start[some])
        and np.array_equal(last[some], stop[some])
        and np.array_equal(count[some], (last - first + 1)[some])
    )
    return (lo, hi) if ok else None


def _key_span(block: int, width: int) -> int:
    """Keys (whole blocks of `block`) that hold the band keys of `block` consecutive queries: C + w - 1
    rounded up to a multiple of C."""
    return -(-(block + width - 1) // block) * block


def band_blocking(mask: Mask, t: int, s: int) -> BandBlocking | None:
    """The blocking of `banded_attention` for `mask` over t queries and s keys, or None when its pattern
    is not a band or when blocking would not skip keys (the span of a query block is not < s)."""
    band = band_limits(mask.pattern)
    if band is None:
        return None
    lo, hi = band
    width = hi - lo + 1
    block = next(
        c
        for c in (_MAX_BLOCK >> i for i in range(_MAX_BLOCK.bit_length()))
        if _key_span(c, width) <= _MAX_SPAN_RATIO * width or c == 1
    )
    span = _key_span(block, width)
    return BandBlocking(lo, hi, block, span) if span < s else None


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
    out = _attention_kernel(query_blocks(q), key_blocks(k), key_blocks(v), blocked, scale, softcap, impl)
    return out.reshape(b, nb * c, n, d)[:, :t]


def xla_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float, softcap: float | None = None
) -> jax.Array:
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
) -> jax.Array:
    """One softmax over two key sets: self keys ks/vs [B, T', K, D] under `self_mask` and cross keys
    kc/vc [B, S, K, D] under `cross_mask` (each a `Mask` or a boolean array broadcastable to [B, T, T'] /
    [B, T, S]).

    The einsum path never concatenates K/V or the masks: scores of both parts share one max and one
    normaliser, and the two weighted sums add in fp32. The fused kernels get the concatenation (a
    structured `Mask` when both masks are).
    """
    impl = resolve_attention_impl(impl, q.dtype, q.shape[-1])
    t = q.shape[1]

    def fused(q, ks, vs, kc, vc, kernel_impl):
        mask = concat_masks(self_mask, cross_mask, t, ks.shape[1], kc.shape[1])
        return attention(
            q, jnp.concatenate([ks, kc], axis=1), jnp.concatenate([vs, vc], axis=1), mask, scale, impl=kernel_impl
        )

    if impl in ("dot_product", "cudnn", "tpu_flash"):
        return fused(q, ks, vs, kc, vc, impl)

    def default(q, ks, vs, kc, vc):
        return xla_merged_attention(q, ks, vs, dense_mask(self_mask), kc, vc, dense_mask(cross_mask), scale)

    if impl == "platform":
        return jax.lax.platform_dependent(q, ks, vs, kc, vc, tpu=lambda *a: fused(*a, "tpu_flash"), default=default)
    return default(q, ks, vs, kc, vc)


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
    out = jnp.einsum(
        "bkgts,bskd->btkgd", (e1 / z).astype(vs.dtype), vs, preferred_element_type=jnp.float32
    ) + jnp.einsum("bkgts,bskd->btkgd", (e2 / z).astype(vc.dtype), vc, preferred_element_type=jnp.float32)
    return out.astype(q.dtype).reshape(b, t, n, d)


def gelu_tanh(x: jax.Array) -> jax.Array:
    return jax.nn.gelu(x, approximate=True)


def mlp(x: jax.Array, gate: jax.Array, up: jax.Array, down: jax.Array) -> jax.Array:
    """GeGLU: down(gelu_tanh(x @ gate) * (x @ up)); x [B, T, H], gate/up [H, I], down [I, H]."""
    g = checkpoint_name(jnp.einsum("bth,hi->bti", x, gate), "mlp_gate")
    u = checkpoint_name(jnp.einsum("bth,hi->bti", x, up), "mlp_up")
    return checkpoint_name(jnp.einsum("bti,ih->bth", gelu_tanh(g) * u, down), "mlp_down")


def self_attention_block(x, w, mask, cos, sin, cfg: ModelConfig, impl: str = "xla"):
    """Encoder attention sub-block (pre-norm → attention → post-norm); returns the residual update [B,T,H].
    `mask`: a `Mask` (key padding [B, T] + static [T, T] pattern) or a bool array broadcastable to [B, T, T]."""
    h = rms_norm(x, w["pre_attn_norm"], cfg.rms_norm_eps)
    q = rms_norm(checkpoint_name(jnp.einsum("bth,hnd->btnd", h, w["q"]), "q_proj"), w["q_norm"], cfg.rms_norm_eps)
    k = rms_norm(checkpoint_name(jnp.einsum("bth,hkd->btkd", h, w["k"]), "k_proj"), w["k_norm"], cfg.rms_norm_eps)
    v = checkpoint_name(jnp.einsum("bth,hkd->btkd", h, w["v"]), "v_proj")
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    o = attention(q, k, v, mask, cfg.attn_scale, impl=impl)
    o = checkpoint_name(jnp.einsum("btnd,ndh->bth", o, w["o"]), "o_proj")
    return rms_norm(o, w["post_attn_norm"], cfg.rms_norm_eps)


def merged_attention_block(
    x,
    enc,
    w,
    self_mask,
    cross_mask,
    cos,
    sin,
    cfg: ModelConfig,
    impl: str = "xla",
    query_index: jax.Array | None = None,
    cross_layout=None,
):
    """Decoder merged attention: one softmax over [self keys (RoPE) ; passage keys (k_norm, no RoPE)].

    x [B, T, H] decoder stream, enc [B, S, H] passage states, self_mask / cross_mask a `Mask` or a bool
    array broadcastable to [B, T, T] / [B, T, S]. With `query_index` [B] (int), only that position of each
    row is a query (keys and values still come from every position): returns [B, 1, H] instead of [B, T, H].
    With `cross_layout` (a `mep.RatioLayout`), enc [B/R, layout.total, H] holds each passage's windows at R
    ratios packed: keys and values are projected from them, then unpacked to [B, layout.width, ...].
    """
    h = rms_norm(x, w["pre_attn_norm"], cfg.rms_norm_eps)
    ks = rms_norm(checkpoint_name(jnp.einsum("bth,hkd->btkd", h, w["k"]), "k_proj"), w["k_norm"], cfg.rms_norm_eps)
    vs = checkpoint_name(jnp.einsum("bth,hkd->btkd", h, w["v"]), "v_proj")
    ks = apply_rope(ks, cos, sin)
    if query_index is not None:
        h = jnp.take_along_axis(h, query_index[:, None, None], axis=1)  # [B, 1, H]
        cos, sin = cos[query_index][:, None], sin[query_index][:, None]  # [B, 1, D]
        dense = dense_mask(self_mask)
        self_mask = jnp.take_along_axis(
            jnp.broadcast_to(dense, (x.shape[0],) + dense.shape[1:]), query_index[:, None, None], axis=1
        )  # [B, 1, T]
    q = rms_norm(checkpoint_name(jnp.einsum("bth,hnd->btnd", h, w["q"]), "q_proj"), w["q_norm"], cfg.rms_norm_eps)
    q = apply_rope(q, cos, sin)
    kc = rms_norm(checkpoint_name(jnp.einsum("bsh,hkd->bskd", enc, w["k"]), "k_passage"), w["k_norm"], cfg.rms_norm_eps)
    vc = checkpoint_name(jnp.einsum("bsh,hkd->bskd", enc, w["v"]), "v_passage")
    if cross_layout is not None:
        kc, vc = cross_layout.unpack(kc), cross_layout.unpack(vc)
    o = merged_attention(q, ks, vs, self_mask, kc, vc, cross_mask, cfg.attn_scale, impl=impl)
    o = checkpoint_name(jnp.einsum("btnd,ndh->bth", o, w["o"]), "o_proj")
    return rms_norm(o, w["post_attn_norm"], cfg.rms_norm_eps)


def mlp_block(x, w, cfg: ModelConfig):
    h = rms_norm(x, w["pre_ffw_norm"], cfg.rms_norm_eps)
    h = mlp(h, w["gate"], w["up"], w["down"])
    return rms_norm(h, w["post_ffw_norm"], cfg.rms_norm_eps)
