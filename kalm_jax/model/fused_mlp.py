"""The MLP sub-block as one Pallas TPU kernel: x + post_norm(down(gelu_tanh(h @ gate) * (h @ up))), h = pre_norm(x).

XLA fuses the sub-block into three matmul fusions and a pass at its end: each of gate and up reads the normed
input, the [tokens, I] gate and up products go to HBM and come back for the down projection, and the post-norm
and residual add read and write [tokens, H] once more (nano's encode: 1.6 GB of HBM traffic per layer where
the sub-block's inputs and outputs are 0.18 GB; benchmarks/2026-12-05-tpu-hbm-bound-and-nano-bytes.md). The
kernel keeps gate, up and down whole in VMEM (fetched once per call: their block index never changes) and
runs one block of `block_rows` tokens per grid step: read x, write x + update; nothing of size [tokens, I]
leaves the chip. It carries a `pl.CostEstimate`, so XLA's cost analysis and scheduler see its FLOPs and bytes.

Where it applies (`fits`): float weights and activations, whole (not split over a mesh axis), and the weights
(one buffer each) with a block of tokens within `VMEM_BYTES`, the scoped VMEM every TPU generation gives a
kernel (nano: 7.5 MiB of bf16 weights, blocks of 512 tokens; the larger presets' MLPs stay on XLA's path, whose
weight reads are amortised over more work per byte). Gate and up are multiplied in chunks of 512 channels, so
the [tokens, I] products never exist whole even in VMEM. `ModelOptions.tpu_mlp` selects it ("fused") when a
program is lowered for TPU; on other platforms the same program runs `layers`' reference.

Gradients: a `custom_vjp` whose backward differentiates the reference (it recomputes the sub-block's forward
in XLA); training keeps the reference (`kalm_jax.training.state`), whose remat policies name its products.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import PartitionSpec as P

from kalm_jax.parallel.mesh import kernel_batch_axes

VMEM_BYTES = 16 * 2**20
"""VMEM the kernel may use: the default scoped VMEM of every TPU generation (all of a v4 core's)."""
BLOCK_ROWS = (512, 256, 128)
"""Tokens per grid step, the largest whose footprint fits `VMEM_BYTES` (fewer when the call has fewer)."""


def _footprint(hidden: int, width: int, itemsize: int, rows: int) -> int:
    # the weights, one buffer each, and 24 bytes per element of a [rows, H] block (x and the output
    # double-buffered, x / h / the accumulator in fp32): 2-8% above Mosaic's VMEM use for H 512-1152 on v4
    return 3 * hidden * width * itemsize + 24 * rows * hidden


def block_rows(hidden: int, width: int, dtype) -> int | None:
    """Tokens per grid step for an MLP of `hidden` x `width` in `dtype`; None when even the smallest block
    does not fit `VMEM_BYTES`."""
    itemsize = np.dtype(dtype).itemsize
    return next((r for r in BLOCK_ROWS if _footprint(hidden, width, itemsize, r) <= VMEM_BYTES), None)


def fits(hidden: int, width: int, dtype) -> bool:
    """Whether an MLP of `hidden` x `width` in `dtype` runs in the kernel (`block_rows` is not None)."""
    return block_rows(hidden, width, dtype) is not None


def _kernel(x_ref, pre_ref, gate_ref, up_ref, down_ref, post_ref, out_ref, *, eps: float, chunk: int):
    x = x_ref[...].astype(jnp.float32)  # [bm, H]
    dtype = x_ref.dtype

    def norm(y, w_ref):
        y = y * jax.lax.rsqrt(jnp.mean(y * y, axis=-1, keepdims=True) + eps)
        return y * (1.0 + w_ref[...].astype(jnp.float32))

    h = norm(x, pre_ref).astype(dtype)
    d = jnp.zeros(x.shape, jnp.float32)
    for c in range(0, gate_ref.shape[1], chunk):  # [bm, chunk] of gate / up at a time: VMEM stays small
        g = jnp.dot(h, gate_ref[:, c : c + chunk], preferred_element_type=jnp.float32)
        u = jnp.dot(h, up_ref[:, c : c + chunk], preferred_element_type=jnp.float32)
        a = (jax.nn.gelu(g, approximate=True) * u).astype(dtype)
        d = d + jnp.dot(a, down_ref[c : c + chunk, :], preferred_element_type=jnp.float32)
    out_ref[...] = (x + norm(d, post_ref).astype(dtype).astype(jnp.float32)).astype(out_ref.dtype)


def _cost(rows: int, hidden: int, width: int, itemsize: int) -> pl.CostEstimate:
    return pl.CostEstimate(
        flops=6 * rows * hidden * width + 3 * rows * width + 12 * rows * hidden,
        transcendentals=rows * width + 2 * rows,
        bytes_accessed=(2 * rows * hidden + 3 * hidden * width + 2 * hidden) * itemsize,
    )


def _chunk(width: int) -> int:
    return next((c for c in (512, 256, 128) if width % c == 0), width)


def _pallas(x2, pre, gate, up, down, post, block: int, eps: float, interpret: bool):
    """x2 [M, H] (M a multiple of `block`) -> x2 + update [M, H]."""
    m, hidden = x2.shape
    width = gate.shape[1]
    row = pl.BlockSpec((block, hidden), lambda i: (i, 0))

    def whole(shape):  # the same block at every step: fetched once, one buffer
        return pl.BlockSpec(shape, lambda i: (0, 0), pipeline_mode=pl.Buffered(1))

    return pl.pallas_call(
        functools.partial(_kernel, eps=eps, chunk=_chunk(width)),
        grid=(m // block,),
        in_specs=[row, whole((1, hidden)), whole((hidden, width)), whole((hidden, width)), whole((width, hidden))]
        + [whole((1, hidden))],
        out_specs=row,
        out_shape=jax.ShapeDtypeStruct(x2.shape, x2.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)),
        cost_estimate=_cost(m, hidden, width, x2.dtype.itemsize),
        interpret=interpret,
        name="kalm_fused_mlp",
    )(x2, pre.reshape(1, hidden), gate, up, down, post.reshape(1, hidden))


def _local(x, pre, gate, up, down, post, eps: float, interpret: bool):
    """x [..., H] on one device -> x + update, through the kernel on rows padded to a multiple of its block."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    m, rows = x2.shape[0], -(-x2.shape[0] // 8) * 8
    most = block_rows(*gate.shape, x.dtype) or BLOCK_ROWS[-1]
    # one block for a short call; else a block that divides the rows, else the largest one and padding
    dividing = next((b for b in BLOCK_ROWS if b <= most and rows % b == 0), most)
    block = rows if rows <= most else dividing
    padded = -(-rows // block) * block
    if padded != m:
        x2 = jnp.pad(x2, ((0, padded - m), (0, 0)))
    out = _pallas(x2, pre, gate, up, down, post, block, eps, interpret)
    return out[:m].reshape(shape)


def fused_mlp_residual(
    x: jax.Array,
    pre: jax.Array,
    gate: jax.Array,
    up: jax.Array,
    down: jax.Array,
    post: jax.Array,
    eps: float,
    reference: Callable,
    *,
    interpret: bool = False,
) -> jax.Array:
    """x [B, T, H] + the MLP sub-block's update, in x's dtype; pre / post [H] norm weights, gate / up [H, I],
    down [I, H]. `reference(x, pre, gate, up, down, post)` computes the same in XLA: the backward pass
    differentiates it. Under a mesh context the kernel runs per shard in a `shard_map` whose batch is split over
    the mesh's batch axes that divide B (`kernel_batch_axes`; weights whole). `interpret`: Pallas interpret mode
    (any backend)."""
    mesh = jax.sharding.get_abstract_mesh()
    run = functools.partial(_local, eps=eps, interpret=interpret)
    if not mesh.empty:
        axes = kernel_batch_axes(mesh, x.shape[0])
        rows = P(axes if axes else None)
        run = jax.shard_map(run, mesh=mesh, in_specs=(rows, P(), P(), P(), P(), P()), out_specs=rows, check_vma=False)

    @jax.custom_vjp
    def f(x, pre, gate, up, down, post):
        return run(x, pre, gate, up, down, post)

    def fwd(*args):
        return run(*args), args

    def bwd(args, ct):
        return jax.vjp(reference, *args)[1](ct)

    f.defvjp(fwd, bwd)
    return f(x, pre, gate, up, down, post)


__all__ = ["BLOCK_ROWS", "VMEM_BYTES", "block_rows", "fits", "fused_mlp_residual"]
