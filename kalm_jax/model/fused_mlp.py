"""The MLP sub-block as one Pallas TPU kernel: x + post_norm(down(gelu_tanh(h @ gate) * (h @ up))), h = pre_norm(x).

XLA fuses the sub-block into three matmul fusions and a pass at its end: each of gate and up reads the normed
input, the [tokens, I] gate and up products go to HBM and come back for the down projection, and the post-norm
and residual add read and write [tokens, H] once more (nano's encode: 1.6 GB of HBM traffic per layer where
the sub-block's inputs and outputs are 0.18 GB; benchmarks/2026-12-05-tpu-hbm-bound-and-nano-bytes.md). The
kernel keeps gate, up and down whole in VMEM (fetched once per call: their block index never changes) and
runs one block of `block_rows` tokens per grid step: read x, write x + update; nothing of size [tokens, I]
leaves the chip. It carries a `pl.CostEstimate`, so XLA's cost analysis and scheduler see its FLOPs and bytes.

Where it applies (`fits`): float weights and activations, and the weights (one buffer each) with a block of tokens
within the kernel's VMEM budget (`vmem_budget`): `VMEM_BYTES`, the scoped VMEM every TPU generation gives a kernel,
or, where the program's TPU generation is known (`ModelOptions.tpu_vmem_bytes`, which the inference engine sets from
its devices, `vmem_capacity`), three quarters of that generation's VMEM (96 MiB on v5e and v6e). Nano (7.5 MiB of
bf16 weights) fits any generation, in blocks of 512 tokens. Under the inference policy's tensor layout each device
holds 1/t of the MLP's channels (`fused_mlp_residual(axis=...)`): large at tensor 2 (75 MiB of bf16 weights per
device) fits v5e and v6e in blocks of 256 tokens. Gate and up are multiplied in chunks of 512 channels, so the
[tokens, I] products never exist whole even in VMEM.

Split weights (`fused_mlp_residual(axis=...)`): the kernel computes each device's partial down projection (no
residual, no post-norm: they need the sum over the devices), then a reduce-scatter (the encoder's sequence
parallelism: the device's tokens were all-gathered before the kernel) or an all-reduce (whole tokens) sums it, and
the post-norm and residual add follow in XLA, as in `kalm_jax.model.layers.project_scatter`.

`ModelOptions.tpu_mlp` selects the kernel ("fused") when a program is lowered for TPU; on other platforms the
same program runs `layers`' reference.

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
from kalm_jax.perf.flops import chip

VMEM_BYTES = 16 * 2**20
"""VMEM the kernel may use where the TPU generation is unknown: the default scoped VMEM of every generation (all of
a v4 core's)."""
VMEM_SHARE = 0.75
"""Share of a generation's VMEM (`vmem_capacity`) the kernel's footprint may take (`vmem_budget`); the scoped
limit it asks Mosaic for is `VMEM_LIMIT_SHARE` of it, the rest left to Mosaic's own scratch."""
VMEM_LIMIT_SHARE = 15 / 16


def vmem_capacity(device_kind: str) -> int | None:
    """VMEM bytes of one TensorCore of the TPU named by `jax.Device.device_kind` ("TPU v5 lite": 128 MiB, "TPU
    v4": 16 MiB; the chip from `kalm_jax.perf.flops.chip`, its VMEM from Pallas's own table,
    `pltpu.get_tpu_info_for_chip`), None for other devices."""
    try:
        version = pltpu.ChipVersion(chip(device_kind))
    except ValueError:  # not a TPU chip Pallas knows (a GPU, a CPU, an unknown kind)
        return None
    return int(pltpu.get_tpu_info_for_chip(version, 1).vmem_capacity_bytes)


def vmem_budget(capacity: int | None) -> int:
    """Bytes the kernel's footprint may take on a TensorCore of `capacity` bytes of VMEM (None: unknown, the
    scoped default `VMEM_BYTES`)."""
    return VMEM_BYTES if capacity is None else max(VMEM_BYTES, int(capacity * VMEM_SHARE))


BLOCK_ROWS = (512, 256, 128)
"""Tokens per grid step, the largest whose footprint fits `VMEM_BYTES` (fewer when the call has fewer)."""


def _footprint(hidden: int, width: int, itemsize: int, rows: int) -> int:
    # the weights, one buffer each, and 24 bytes per element of a [rows, H] block (x and the output
    # double-buffered, x / h / the accumulator in fp32): 2-8% above Mosaic's VMEM use for H 512-1152 on v4
    return 3 * hidden * width * itemsize + 24 * rows * hidden


def block_rows(hidden: int, width: int, dtype, capacity: int | None = None) -> int | None:
    """Tokens per grid step for an MLP of `hidden` x `width` (one device's channels) in `dtype` on a TensorCore
    of `capacity` bytes of VMEM (None: unknown); None when even the smallest block does not fit
    `vmem_budget(capacity)`."""
    itemsize, budget = np.dtype(dtype).itemsize, vmem_budget(capacity)
    return next((r for r in BLOCK_ROWS if _footprint(hidden, width, itemsize, r) <= budget), None)


def fits(hidden: int, width: int, dtype, capacity: int | None = None) -> bool:
    """Whether an MLP of `hidden` x `width` in `dtype` runs in the kernel (`block_rows` is not None)."""
    return block_rows(hidden, width, dtype, capacity) is not None


def _norm(y: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """Gemma's RMS norm of fp32 `y` [..., H] with `weight` [1, H] (scale 1 + weight), in fp32."""
    y = y * jax.lax.rsqrt(jnp.mean(y * y, axis=-1, keepdims=True) + eps)
    return y * (1.0 + weight.astype(jnp.float32))


def _kernel(x_ref, pre_ref, gate_ref, up_ref, down_ref, post_ref, out_ref, *, eps: float, chunk: int, partial: bool):
    x = x_ref[...].astype(jnp.float32)  # [bm, H]
    dtype = x_ref.dtype
    h = _norm(x, pre_ref[...], eps).astype(dtype)
    d = jnp.zeros(x.shape, jnp.float32)
    for c in range(0, gate_ref.shape[1], chunk):  # [bm, chunk] of gate / up at a time: VMEM stays small
        g = jnp.dot(h, gate_ref[:, c : c + chunk], preferred_element_type=jnp.float32)
        u = jnp.dot(h, up_ref[:, c : c + chunk], preferred_element_type=jnp.float32)
        a = (jax.nn.gelu(g, approximate=True) * u).astype(dtype)
        d = d + jnp.dot(a, down_ref[c : c + chunk, :], preferred_element_type=jnp.float32)
    if partial:  # this device's share of the down projection; the caller sums the devices', then norms
        out_ref[...] = d.astype(out_ref.dtype)
    else:
        out_ref[...] = (x + _norm(d, post_ref[...], eps).astype(dtype).astype(jnp.float32)).astype(out_ref.dtype)


def _cost(rows: int, hidden: int, width: int, itemsize: int) -> pl.CostEstimate:
    return pl.CostEstimate(
        flops=6 * rows * hidden * width + 3 * rows * width + 12 * rows * hidden,
        transcendentals=rows * width + 2 * rows,
        bytes_accessed=(2 * rows * hidden + 3 * hidden * width + 2 * hidden) * itemsize,
    )


def _chunk(width: int) -> int:
    return next((c for c in (512, 256, 128) if width % c == 0), width)


def _pallas(x2, pre, gate, up, down, post, block: int, eps: float, interpret: bool, partial: bool, capacity):
    """x2 [M, H] (M a multiple of `block`) -> x2 + update [M, H] (`partial`: the down projection alone)."""
    m, hidden = x2.shape
    width = gate.shape[1]
    footprint = _footprint(hidden, width, x2.dtype.itemsize, block)
    # above the default scoped VMEM, ask for most of the generation's (only known there: `block_rows`)
    limit = int(capacity * VMEM_LIMIT_SHARE) if capacity and footprint > VMEM_BYTES else None
    row = pl.BlockSpec((block, hidden), lambda i: (i, 0))

    def whole(shape):  # the same block at every step: fetched once, one buffer
        return pl.BlockSpec(shape, lambda i: (0, 0), pipeline_mode=pl.Buffered(1))

    return pl.pallas_call(
        functools.partial(_kernel, eps=eps, chunk=_chunk(width), partial=partial),
        grid=(m // block,),
        in_specs=[row, whole((1, hidden)), whole((hidden, width)), whole((hidden, width)), whole((width, hidden))]
        + [whole((1, hidden))],
        out_specs=row,
        out_shape=jax.ShapeDtypeStruct(x2.shape, x2.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",), vmem_limit_bytes=limit),
        cost_estimate=_cost(m, hidden, width, x2.dtype.itemsize),
        interpret=interpret,
        name="kalm_fused_mlp",
    )(x2, pre.reshape(1, hidden), gate, up, down, post.reshape(1, hidden))


def _local(x, pre, gate, up, down, post, eps: float, interpret: bool, partial: bool = False, capacity=None):
    """x [..., H] on one device -> x + update (`partial`: this device's down projection), through the kernel on
    rows padded to a multiple of its block."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    m, rows = x2.shape[0], -(-x2.shape[0] // 8) * 8
    most = block_rows(*gate.shape, x.dtype, capacity) or BLOCK_ROWS[-1]
    # one block for a short call; else a block that divides the rows, else the largest one and padding
    dividing = next((b for b in BLOCK_ROWS if b <= most and rows % b == 0), most)
    block = rows if rows <= most else dividing
    padded = -(-rows // block) * block
    if padded != m:
        x2 = jnp.pad(x2, ((0, padded - m), (0, 0)))
    out = _pallas(x2, pre, gate, up, down, post, block, eps, interpret, partial, capacity)
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
    axis: str | None = None,
    sequence: bool = False,
    capacity: int | None = None,
    interpret: bool = False,
) -> jax.Array:
    """x [B, T, H] + the MLP sub-block's update, in x's dtype; pre / post [H] norm weights, gate / up [H, I],
    down [I, H]. `reference(x, pre, gate, up, down, post)` computes the same in XLA: the backward pass
    differentiates it. Under a mesh context the kernel runs per shard in a `shard_map` whose batch is split over
    the mesh's batch axes that divide B (`kernel_batch_axes`).

    `axis`: None, weights whole on every device; or a mesh axis the MLP's channels are split over (the inference
    policy's tensor layout: gate / up by columns, down by rows; I divisible by its size): the kernel writes each
    device's partial down projection, summed over `axis` by a reduce-scatter back to the device's tokens when x's
    tokens are split over it (`sequence`: the encoder's sequence parallelism; all-gathered before the kernel), else
    by an all-reduce; the post-norm and residual add follow in XLA. `capacity`: the VMEM bytes of the program's
    TPU generation (`vmem_capacity`; None: unknown). `interpret`: Pallas interpret mode (any backend)."""
    mesh = jax.sharding.get_abstract_mesh()
    if axis is None:
        run = functools.partial(_local, eps=eps, interpret=interpret, capacity=capacity)
        if not mesh.empty:
            axes = kernel_batch_axes(mesh, x.shape[0])
            rows = P(axes if axes else None)
            in_specs = (rows, P(), P(), P(), P(), P())
            run = jax.shard_map(run, mesh=mesh, in_specs=in_specs, out_specs=rows, check_vma=False)
        return _with_reference_vjp(run, reference)(x, pre, gate, up, down, post)

    axes = kernel_batch_axes(mesh, x.shape[0])
    batch = axes if axes else None
    rows = P(batch, axis) if sequence else P(batch)

    def local(x, pre, gate, up, down, post):
        whole = jax.lax.all_gather(x, axis, axis=1, tiled=True) if sequence else x
        d = _local(whole, pre, gate, up, down, post, eps, interpret, partial=True, capacity=capacity)
        d = jax.lax.psum_scatter(d, axis, scatter_dimension=1, tiled=True) if sequence else jax.lax.psum(d, axis)
        return x + _norm(d.astype(jnp.float32), post.reshape(1, -1), eps).astype(x.dtype)

    in_specs = (rows, P(), P(None, axis), P(None, axis), P(axis, None), P())
    run = jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=rows, check_vma=False)
    return _with_reference_vjp(run, reference)(x, pre, gate, up, down, post)


def _with_reference_vjp(run: Callable, reference: Callable) -> Callable:
    """`run` with the gradient of `reference` (the same function in XLA): the kernel has no backward."""

    @jax.custom_vjp
    def f(*args):
        return run(*args)

    def fwd(*args):
        return run(*args), args

    def bwd(args, ct):
        return jax.vjp(reference, *args)[1](ct)

    f.defvjp(fwd, bwd)
    return f


__all__ = [
    "BLOCK_ROWS",
    "VMEM_BYTES",
    "VMEM_SHARE",
    "VMEM_LIMIT_SHARE",
    "block_rows",
    "fits",
    "fused_mlp_residual",
    "vmem_budget",
    "vmem_capacity",
]
