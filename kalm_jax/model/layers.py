"""Pure functions for the T5Gemma 2 blocks: Gemma RMSNorm, half-split RoPE, the attention blocks, GeGLU
(attention itself: `kalm_jax.model.attention`), and the encoder's sequence parallelism under split weights
(`sequence_axis`, `pre_norm`, `project_scatter`).

Shape letters: B batch, T query length, S key length, H hidden, N query heads, K kv heads, G = N/K,
D head dim, I MLP width.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import qwix
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec as P

from kalm_jax.model import fused_mlp
from kalm_jax.model.attention import dispatch, masks
from kalm_jax.model.config import ModelConfig
from kalm_jax.model.options import ModelOptions

_NEG = float(np.finfo(np.float32).min)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float, inverse: jax.Array | None = None) -> jax.Array:
    """Gemma RMSNorm over the last axis: x·rsqrt(mean x² + eps)·(1 + w), in fp32, cast back to x.dtype.
    `inverse`: `rms_inverse(x, eps)` when computed already (e.g. before x's tokens were gathered)."""
    xf = x.astype(jnp.float32)
    y = xf * (rms_inverse(x, eps) if inverse is None else inverse)
    return (y * (1.0 + weight.astype(jnp.float32))).astype(x.dtype)


def rms_inverse(x: jax.Array, eps: float) -> jax.Array:
    """rsqrt(mean x² + eps) over the last axis of x [..., H], in fp32: [..., 1]."""
    xf = x.astype(jnp.float32)
    return jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)


def rope_table(length: int, head_dim: int, theta: float, factor: float) -> tuple[jax.Array, jax.Array]:
    """cos, sin [length, D] in fp32 for positions 0..length-1; linear scaling divides inv_freq by `factor`."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    inv_freq = inv_freq / factor
    angles = jnp.arange(length, dtype=jnp.float32)[:, None] * inv_freq[None, :]
    emb = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Half-split (NeoX) rotation of x [B, T, heads, D] with cos/sin [T, D] (or per row [B, T, D]),
    cast to x.dtype.

    The same numbers on every platform, two formulations: lowered for TPU (`jax.lax.platform_dependent`, also
    AOT from a CPU host) the swap of the halves is a matmul with a signed permutation (`rope_rotation_matmul`), so
    that XLA fuses the q/k norm before it, the rotation and the attention scale after it into that one matmul
    fusion; sliced halves there cost three more passes over q and k. Elsewhere the halves rotate directly
    (`rope_rotation_halves`), which costs no matmul FLOPs on a CPU.
    """
    if cos.ndim == 2:
        cos, sin = cos[None], sin[None]
    return jax.lax.platform_dependent(x, cos, sin, tpu=rope_rotation_matmul, default=rope_rotation_halves)


def rope_rotation_halves(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """`apply_rope` of x [B, T, heads, D] with cos/sin [B or 1, T, D]: each half rotated with its slice of the
    tables."""
    half = x.shape[-1] // 2
    # The tables repeat their first half (rope_table), so each half of x rotates with the same cos/sin:
    # [x1, x2] -> [x1·cos - x2·sin, x2·cos + x1·sin], without building rotate_half(x).
    cos = cos[..., :half].astype(x.dtype)[:, :, None, :]
    sin = sin[..., :half].astype(x.dtype)[:, :, None, :]
    x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


@functools.cache
def _half_swap(d: int) -> np.ndarray:
    """The signed permutation R [D, D] with x @ R = [-x2, x1] for x = [x1, x2] (rotate_half)."""
    half = d // 2
    r = np.zeros((d, d), np.float32)
    r[np.arange(half) + half, np.arange(half)] = -1.0
    r[np.arange(half), np.arange(half) + half] = 1.0
    return r


def rope_rotation_matmul(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """`rope_rotation_halves` as x·cos + (x @ R)·sin with R the signed half swap: exact (one ±1 term per output;
    fp32 inputs at HIGHEST precision, so no bf16 rounding of x on the MXU)."""
    swap = jnp.asarray(_half_swap(x.shape[-1]), x.dtype)
    precision = jax.lax.Precision.HIGHEST if x.dtype == jnp.float32 else None
    rotated = jnp.einsum("btnd,de->btne", x, swap, precision=precision)
    cos = cos.astype(x.dtype)[:, :, None, :]
    sin = sin.astype(x.dtype)[:, :, None, :]
    return x * cos + rotated * sin


def project(spec: str, x: jax.Array, w, options: ModelOptions | None = None) -> jax.Array:
    """A projection or MLP matmul `jnp.einsum(spec, x, w)` whose weight `w` may be quantized.

    `w` a float array: a plain einsum. `w` a `qwix.QArray` (`kalm_jax.model.quantization`): Qwix's einsum;
    with ``options.activations == "int8"`` the input is first quantized per row to int8 (absmax over the
    contracted axes, one scale per token), so the matmul runs int8 x int8 with an int32 accumulator;
    otherwise the weight is dequantized into the matmul (XLA fuses it). The result has x's dtype.
    Attention's score and value einsums never come here: they stay in float.
    """
    if not isinstance(w, qwix.QArray):
        return jnp.einsum(spec, x, w)
    if options is not None and options.activations == "int8":
        lhs = spec.split(",")[0]
        contracted = set(lhs) & set(spec.split(",")[1].split("->")[0])
        rows = tuple(i for i, c in enumerate(lhs) if c not in contracted)
        x = qwix.quantize(x, jnp.int8, channelwise_axes=rows)
    return qwix.einsum(spec, x, w).astype(w.dtype)


def splits_tokens(cfg: ModelConfig, options: ModelOptions, axis: str, size: int, length: int) -> bool:
    """Whether the encoder, run with `options`, splits `length` tokens over a mesh axis `axis` of `size` devices:
    the options name that axis (`ModelOptions.sequence_parallel`), the activations are not int8 (their per-token
    scale spans every head and MLP channel, which no one device holds under the split), and `size` > 1 divides
    the tokens, the query heads and the MLP width (the slices of the row-parallel projections). Static: the
    inference policy sizes its working set with it before any mesh exists."""
    return (
        options.sequence_parallel == axis
        and options.activations != "int8"
        and size > 1
        and all(n % size == 0 for n in (length, cfg.num_heads, cfg.intermediate_size))
    )


def sequence_axis(cfg: ModelConfig, options: ModelOptions, rows: int, length: int) -> str | None:
    """The mesh axis the encoder splits its tokens over (`ModelOptions.sequence_parallel`), or None (whole tokens).

    The named axis applies where the context mesh (`jax.set_mesh`) has it, `splits_tokens` holds for its size,
    and the mesh's other axes, which split the batch, divide its `rows`."""
    axis = options.sequence_parallel
    mesh = jax.sharding.get_abstract_mesh()
    if axis is None or mesh.empty or axis not in mesh.axis_names:
        return None
    batch = int(np.prod([n for a, n in mesh.shape.items() if a != axis]))
    return axis if splits_tokens(cfg, options, axis, mesh.shape[axis], length) and rows % batch == 0 else None


def _activation_spec(axis: str, *dims) -> P:
    """The spec of an activation [B, ...] under sequence parallelism over `axis`: the batch split over the
    context mesh's other axes (the inference policy's data axes), the other dimensions as `dims` say."""
    mesh = jax.sharding.get_abstract_mesh()
    return P(tuple(a for a in mesh.axis_names if a != axis), *dims)


def split_tokens(x: jax.Array, axis: str) -> jax.Array:
    """x [B, T, ...] unchanged, laid out with its tokens split over mesh `axis` (each device keeps its slice)."""
    spec = _activation_spec(axis, axis)
    return jax.shard_map(lambda x: x, in_specs=spec, out_specs=spec)(x)


def gather_tokens(x, axis: str):
    """x [B, T, ...] (or a pytree of such) with tokens split over mesh `axis` -> whole on every device of the axis
    (all-gathers)."""

    def gather(x):
        return jax.tree.map(lambda a: jax.lax.all_gather(a, axis, axis=1, tiled=True), x)

    split, whole = _activation_spec(axis, axis), _activation_spec(axis)
    return jax.shard_map(gather, in_specs=(split,), out_specs=whole, check_vma=False)(x)


def pre_norm(x: jax.Array, weight: jax.Array, eps: float, sequence: str | None) -> jax.Array:
    """A sub-block's input norm `rms_norm(x, weight, eps)` [B, T, H], with whole tokens. `sequence`: x's tokens
    are split over that mesh axis: each device takes its tokens' statistics, then the raw tokens and the
    statistics are gathered and the norm applied whole, so that XLA fuses it into the projections' input as
    it does without the split (gathering the normed tokens instead would write them out once more)."""
    if sequence is None:
        return rms_norm(x, weight, eps)
    x, inverse = gather_tokens((x, rms_inverse(x, eps)), sequence)
    return rms_norm(x, weight, eps, inverse)


def project_scatter(spec: str, x: jax.Array, w, options: ModelOptions | None, axis: str) -> jax.Array:
    """A row-parallel `project` (the attention output "btnd,ndh->bth", the MLP down "bti,ih->bth") with its
    result's tokens split over mesh `axis`: each device multiplies its slice of the contracted leading weight
    axis (heads, MLP channels) and a reduce-scatter sums the partial products and splits the tokens, where the
    plain matmul under split weights would all-reduce whole tokens. `w` may be quantized (its scales, one per
    output channel, stay whole); it is whole over the mesh's other axes (the inference policy's layout)."""
    operands, _ = spec.split("->")
    x_axes, w_axes = operands.split(",")
    x_spec = _activation_spec(axis, *(axis if a == w_axes[0] else None for a in x_axes[1:]))
    rows = w.shape[0]
    w_spec = jax.tree.map(lambda leaf: P(axis) if leaf.ndim and leaf.shape[0] == rows else P(), w)

    def local(x, w):
        return jax.lax.psum_scatter(project(spec, x, w, options), axis, scatter_dimension=1, tiled=True)

    return jax.shard_map(local, in_specs=(x_spec, w_spec), out_specs=_activation_spec(axis, axis))(x, w)


def gelu_tanh(x: jax.Array) -> jax.Array:
    return jax.nn.gelu(x, approximate=True)


def mlp(x: jax.Array, gate, up, down, options: ModelOptions | None = None, sequence: str | None = None) -> jax.Array:
    """GeGLU: down(gelu_tanh(x @ gate) * (x @ up)); x [B, T, H], gate/up [H, I], down [I, H] (arrays or
    quantized weights, `project`). `sequence`: a mesh axis (`sequence_axis`): the result leaves with its tokens
    split over it (`project_scatter`)."""
    g = checkpoint_name(project("bth,hi->bti", x, gate, options), "mlp_gate")
    u = checkpoint_name(project("bth,hi->bti", x, up, options), "mlp_up")
    return checkpoint_name(_row_parallel("bti,ih->bth", gelu_tanh(g) * u, down, options, sequence), "mlp_down")


def _row_parallel(spec: str, x: jax.Array, w, options: ModelOptions | None, sequence: str | None) -> jax.Array:
    return project(spec, x, w, options) if sequence is None else project_scatter(spec, x, w, options, sequence)


def attention_kwargs(options: ModelOptions) -> dict:
    """The `dispatch.attention` / `dispatch.merged_attention` keywords of the model's options."""
    return {"impl": options.attention_impl, "tpu": options.tpu_attention, "interpret": options.pallas_interpret}


def self_attention_block(x, w, mask, cos, sin, cfg: ModelConfig, options: ModelOptions, sequence: str | None = None):
    """Encoder attention sub-block (pre-norm → attention → post-norm); returns the residual update [B,T,H].
    `mask`: a `Mask` (key padding [B, T] + static [T, T] pattern) or a bool array broadcastable to [B, T, T].
    `options`: the attention kernel (`attention_kwargs`). `sequence`: a mesh axis (`sequence_axis`) x's tokens
    are split over: they are gathered for the projections (`pre_norm`), the update leaves split likewise."""
    h = pre_norm(x, w["pre_attn_norm"], cfg.rms_norm_eps, sequence)
    q = rms_norm(checkpoint_name(project("bth,hnd->btnd", h, w["q"], options), "q_proj"), w["q_norm"], cfg.rms_norm_eps)
    k = rms_norm(checkpoint_name(project("bth,hkd->btkd", h, w["k"], options), "k_proj"), w["k_norm"], cfg.rms_norm_eps)
    v = checkpoint_name(project("bth,hkd->btkd", h, w["v"], options), "v_proj")
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    o = dispatch.attention(q, k, v, mask, cfg.attn_scale, **attention_kwargs(options))
    o = checkpoint_name(_row_parallel("btnd,ndh->bth", o, w["o"], options, sequence), "o_proj")
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
    options: ModelOptions,
    query_index: jax.Array | None = None,
    cross_layout=None,
):
    """Decoder merged attention: one softmax over [self keys (RoPE) ; passage keys (k_norm, no RoPE)].

    x [B, T, H] decoder stream, enc [B, S, H] passage states, self_mask / cross_mask a `Mask` or a bool
    array broadcastable to [B, T, T] / [B, T, S]. With `query_index` [B] (int), only that position of each
    row is a query (keys and values still come from every position): returns [B, 1, H] instead of [B, T, H].
    With `cross_layout` (a `mep.RatioLayout`), enc [B/R, layout.total, H] holds each passage's windows at R
    ratios packed: keys and values are projected from them, then unpacked to [B, layout.width, ...].
    `options`: the attention kernel (`attention_kwargs`).
    """
    h = rms_norm(x, w["pre_attn_norm"], cfg.rms_norm_eps)
    ks = rms_norm(
        checkpoint_name(project("bth,hkd->btkd", h, w["k"], options), "k_proj"), w["k_norm"], cfg.rms_norm_eps
    )
    vs = checkpoint_name(project("bth,hkd->btkd", h, w["v"], options), "v_proj")
    ks = apply_rope(ks, cos, sin)
    if query_index is not None:
        h = jnp.take_along_axis(h, query_index[:, None, None], axis=1)  # [B, 1, H]
        cos, sin = cos[query_index][:, None], sin[query_index][:, None]  # [B, 1, D]
        dense = masks.dense_mask(self_mask)
        self_mask = jnp.take_along_axis(
            jnp.broadcast_to(dense, (x.shape[0],) + dense.shape[1:]), query_index[:, None, None], axis=1
        )  # [B, 1, T]
    q = rms_norm(checkpoint_name(project("bth,hnd->btnd", h, w["q"], options), "q_proj"), w["q_norm"], cfg.rms_norm_eps)
    q = apply_rope(q, cos, sin)
    kc = rms_norm(
        checkpoint_name(project("bsh,hkd->bskd", enc, w["k"], options), "k_passage"), w["k_norm"], cfg.rms_norm_eps
    )
    vc = checkpoint_name(project("bsh,hkd->bskd", enc, w["v"], options), "v_passage")
    if cross_layout is not None:
        kc, vc = cross_layout.unpack(kc), cross_layout.unpack(vc)
    o = dispatch.merged_attention(q, ks, vs, self_mask, kc, vc, cross_mask, cfg.attn_scale, **attention_kwargs(options))
    o = checkpoint_name(project("btnd,ndh->bth", o, w["o"], options), "o_proj")
    return rms_norm(o, w["post_attn_norm"], cfg.rms_norm_eps)


def mlp_block(x, w, cfg: ModelConfig, options: ModelOptions | None = None, sequence: str | None = None):
    """MLP sub-block (pre-norm → GeGLU → post-norm); returns the residual update of x [B, T, H] (`sequence`:
    as in `self_attention_block`)."""
    h = pre_norm(x, w["pre_ffw_norm"], cfg.rms_norm_eps, sequence)
    h = mlp(h, w["gate"], w["up"], w["down"], options, sequence)
    return rms_norm(h, w["post_ffw_norm"], cfg.rms_norm_eps)


def mlp_residual(x, w, cfg: ModelConfig, options: ModelOptions | None = None, sequence: str | None = None):
    """x [B, T, H] + `mlp_block(x, ...)`: through the fused Pallas kernel (`fused_mlp`) when the program is
    lowered for TPU, ``options.tpu_mlp == "fused"`` and `fuses_mlp` holds; else the reference. Under weights
    split over the context mesh's ``tensor`` axis the kernel takes each device's channels and the partial
    products are summed over the axis (`fused_mlp.fused_mlp_residual`'s `axis`; `sequence`: x's tokens are split
    over it)."""

    def reference(x, pre, gate, up, down, post):
        weights = {"pre_ffw_norm": pre, "gate": gate, "up": up, "down": down, "post_ffw_norm": post}
        return x + mlp_block(x, weights, cfg, options, sequence)

    args = (x, w["pre_ffw_norm"], w["gate"], w["up"], w["down"], w["post_ffw_norm"])
    if options is None or options.tpu_mlp != "fused" or not fuses_mlp(w, x.dtype, options, sequence):
        return reference(*args)
    kwargs = {"capacity": options.tpu_vmem_bytes, "interpret": options.pallas_interpret}
    if _tensor_size() > 1:
        kwargs.update(axis="tensor", sequence=sequence is not None)

    def tpu(*args):
        return fused_mlp.fused_mlp_residual(*args, cfg.rms_norm_eps, reference, **kwargs)

    if options.pallas_interpret:
        return tpu(*args)
    return jax.lax.platform_dependent(*args, tpu=tpu, default=reference)


def _tensor_size() -> int:
    """The size of the context mesh's ``tensor`` axis (1: no mesh, or no such axis)."""
    mesh = jax.sharding.get_abstract_mesh()
    return mesh.shape["tensor"] if not mesh.empty and "tensor" in mesh.axis_names else 1


def fuses_mlp(w, dtype, options: ModelOptions, sequence: str | None) -> bool:
    """Whether the fused MLP kernel applies to a layer's weights `w`: float weights of `dtype`, float activations,
    and one device's channels (all of them, or 1/t under a ``tensor`` axis of size t on the context mesh, which
    must divide them) within the kernel's VMEM budget on the program's TPU generation (`fused_mlp.fits` with
    `options.tpu_vmem_bytes`). Tokens split over a mesh axis (`sequence`) only over that ``tensor`` axis."""
    gate = w["gate"]
    if any(isinstance(w[k], qwix.QArray) for k in ("gate", "up", "down")) or options.activations != "float":
        return False
    hidden, width = gate.shape
    t = _tensor_size()
    if gate.dtype != dtype or width % t or (sequence is not None and (t == 1 or sequence != "tensor")):
        return False
    return fused_mlp.fits(hidden, width // t, dtype, options.tpu_vmem_bytes)
