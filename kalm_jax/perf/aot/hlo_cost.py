"""Instructions the TPU compiler's cost analysis does not model, found in the compiled HLO and accounted.

XLA:TPU's `cost_analysis()` gives each instruction without a cost model (a custom call such as the
`ConcatBitcast` that joins an async copy's slices, or a Pallas `tpu_custom_call` kernel) no FLOPs and
no bytes; a `ConcatBitcast` adds -1 second to `optimal_seconds`, a kernel 0 (checked on v5e: 50
`ConcatBitcast`s and 18 splash kernels give -49.87). `unknown_ops` lists every custom call of a compiled program
with its operand and output shapes (read from the HLO text), and `account` turns them into figures:

* data movement (`DATA_MOVEMENT`, e.g. `ConcatBitcast`): no FLOPs; bytes = the joined buffer, once; their
  time at the chip's HBM bandwidth is added to the roofline. A `ConcatBitcast` is XLA's memory-space
  assignment joining the async slices of a sliced prefetch, which it places contiguously (the join moves
  nothing itself); the compiler's analysis of the same program compiled without sliced prefetch
  (`xla_tpu_sliced_prefetch_max_slices=0`: a plain copy, no `ConcatBitcast`) charges the sliced
  program's bytes plus each joined buffer once, and that time (to 0.1%);
* the splash attention forward kernel (`ATTENTION_KERNELS`, the engine's TPU attention): FLOPs
  4·rows·keys·head_dim per query row and head (QKᵀ and PV over every key block: exact where a row is one key
  block, an upper bound where the mask skips blocks), bytes = q, k / v (once per query block), the segment
  ids and the output; its time is the roofline of those, max(FLOPs / peak, bytes / HBM bandwidth);
* a kernel that carries a `pl.CostEstimate` (the fused MLP, `kalm_jax.model.fused_mlp`) is not unknown: XLA's
  analysis takes its FLOPs and bytes from the estimate and times it itself (checked on v5e: a FLOPs-bound
  estimate at FLOPs / peak exactly, a bytes-bound one about 10% above bytes / the datasheet bandwidth);
* any other kernel (its FLOPs are not visible in the HLO) is *unaccounted*: the row then carries no MFU
  and says why.

A second guard lives in `aot.cost_row`: when the FLOPs fall short of the analytic useful FLOPs (work in
instructions whose FLOPs nothing sees, e.g. a collective matmul's loop), the row prints no MFU either.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping

import numpy as np

DATA_MOVEMENT = ("ConcatBitcast",)
"""Custom-call targets without a cost model that stand for a copy (cost: the output written once; see above)."""
KERNELS = ("tpu_custom_call",)
"""Custom-call targets without a cost model whose FLOPs the HLO does not show (Pallas / Mosaic kernels)."""
ATTENTION_KERNELS = ("splash_mha_fwd",)
"""Name prefixes of the Pallas kernels `account` costs from their operands: the splash attention forward kernel
(`jax.experimental.pallas.ops.tpu.splash_attention`, the engine's attention on TPU; the HLO instruction carries
the kernel's name)."""
UNKNOWN_COST = DATA_MOVEMENT + KERNELS
"""The custom-call targets XLA:TPU's cost analysis does not model (each adds -1 to `optimal_seconds`);
others (e.g. `AsyncCollectiveStart` inside fusions) are costed by it."""

# HBM bandwidth per JAX device (one chip), bytes/s: datasheet figures.
HBM_BANDWIDTH: dict[str, float] = {"v4": 1228e9, "v5e": 819e9, "v5p": 2765e9, "v6e": 1640e9}

_DTYPE_BYTES = {
    "pred": 1,
    "s4": 0.5,
    "u4": 0.5,
    "s8": 1,
    "u8": 1,
    "f8e4m3fn": 1,
    "f8e5m2": 1,
    "s16": 2,
    "u16": 2,
    "f16": 2,
    "bf16": 2,
    "s32": 4,
    "u32": 4,
    "f32": 4,
    "s64": 8,
    "u64": 8,
    "f64": 8,
    "c64": 8,
    "c128": 16,
}
_ARRAY = re.compile(r"\b(" + "|".join(sorted(_DTYPE_BYTES, key=len, reverse=True)) + r")\[([\d,]*)\]")
# "%name = <shape> custom-call(%a, %b), ... custom_call_target="X"" (also "ROOT %name = ...")
_DEF = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(.*?)\s+([\w\-]+)\((.*)$")
_TARGET = re.compile(r'custom_call_target="([^"]+)"')
_OPERAND = re.compile(r"%([\w.\-]+)")
_COSTED = '"cost_estimate":'  # a Pallas kernel's backend config with its `pl.CostEstimate`: XLA costs the call


def shape_bytes(shape_text: str) -> int:
    """Bytes of an HLO shape string (an array, or a tuple of arrays: their sum), e.g. "bf16[8,128]{1,0}"."""
    total = 0.0
    for dtype, dims in _ARRAY.findall(shape_text):
        n = int(np.prod([int(d) for d in dims.split(",") if d], dtype=np.int64)) if dims else 1
        total += n * _DTYPE_BYTES[dtype]
    return int(total)


@dataclasses.dataclass(frozen=True)
class UnknownOp:
    """A custom call of a compiled program: `target`, instruction `name`, output bytes, and the HLO shape
    strings of its output and of each operand (in order)."""

    target: str
    name: str
    output_bytes: int
    output_shape: str = ""
    operand_shapes: tuple[str, ...] = ()

    @property
    def data_movement(self) -> bool:
        return self.target in DATA_MOVEMENT

    @property
    def bytes(self) -> int:
        """Bytes a data-movement op is charged: its output, once (the module docstring says why)."""
        return self.output_bytes

    @property
    def attention_kernel(self) -> bool:
        return self.target in KERNELS and self.name.startswith(ATTENTION_KERNELS)


def _arrays(shape_text: str) -> list[tuple[str, tuple[int, ...]]]:
    return [(dt, tuple(int(d) for d in dims.split(",") if d)) for dt, dims in _ARRAY.findall(shape_text)]


def attention_kernel_cost(op: UnknownOp) -> tuple[float, float]:
    """(FLOPs, HBM bytes) of one splash attention forward kernel call from its HLO shapes.

    Its operands hold q [..., R, D] (the last array of the output has its shape: the attention output; the
    other output arrays are the kernel's per-block scratch) followed by k and v [..., S, D], besides the
    segment ids and the mask's block metadata. FLOPs = 4·(q rows over every leading dim)·S·D (QKᵀ and PV).
    Bytes = q read and the output written once, k and v read once per query block (`splash.block_size` of R),
    every other operand once. Raises ValueError when the shapes do not read that way."""
    from kalm_jax.model.attention.splash import block_size

    out = _arrays(op.output_shape)
    operands = [_arrays(s) for s in op.operand_shapes]
    if not out:
        raise ValueError(f"{op.name}: no output array in {op.output_shape!r}")
    q_array = out[-1]
    try:
        qi = next(i for i, a in enumerate(operands) if a == [q_array])
        ki, vi = (i for i, a in enumerate(operands) if i > qi and len(a) == 1 and len(a[0][1]) == len(q_array[1]))
    except (StopIteration, ValueError):
        raise ValueError(f"{op.name}: operands {op.operand_shapes} do not read as q, k, v") from None
    (_, q), (_, k) = q_array, operands[ki][0]
    rows, depth, keys = int(np.prod(q[:-1])), q[-1], k[-2]
    if k[-1] != depth or operands[vi][0][1] != k:
        raise ValueError(f"{op.name}: k {k} / v {operands[vi][0][1]} do not match q {q}")
    flops = 4.0 * rows * keys * depth
    q_blocks = -(-q[-2] // block_size(q[-2])) if q[-2] % 128 == 0 else 1
    sizes = [shape_bytes(s) for s in op.operand_shapes]
    kv = sizes[ki] + sizes[vi]
    read = sum(sizes) - kv + kv * q_blocks
    return flops, float(read + shape_bytes(f"{q_array[0]}[{','.join(map(str, q))}]"))


def unknown_ops(hlo_text: str, targets: tuple[str, ...] | None = UNKNOWN_COST) -> list[UnknownOp]:
    """The custom calls in `hlo_text` (a compiled program's `as_text()`) whose target is in `targets` (None:
    every custom call), with their operands' shapes resolved from their definitions in the same text. A Pallas
    kernel whose backend config carries a cost estimate (`pl.pallas_call(cost_estimate=...)`, e.g.
    `kalm_jax.model.fused_mlp`) is left out: XLA's cost analysis counts its FLOPs, bytes and time itself."""
    shapes: dict[str, str] = {}
    calls: list[tuple[str, str, str, str]] = []
    for line in hlo_text.splitlines():
        m = _DEF.match(line)
        if not m:
            continue
        name, shape, op, rest = m.groups()
        shapes[name] = shape
        if op == "custom-call" and _COSTED not in rest:
            target = _TARGET.search(rest)
            args = rest.split(")", 1)[0]
            calls.append((name, shape, target.group(1) if target else "?", args))
    out = []
    for name, shape, target, args in calls:
        if targets is not None and target not in targets:
            continue
        operand_shapes = tuple(shapes.get(a, "") for a in _OPERAND.findall(args))
        out.append(
            UnknownOp(
                target,
                name,
                shape_bytes(shape),
                output_shape=shape,
                operand_shapes=operand_shapes,
            )
        )
    return out


def account(ops: list[UnknownOp], raw_seconds: float, generation: str) -> dict:
    """Cost fields for `ops` given the compiler's raw `optimal_seconds` on a chip of `generation`.

    Returns `unknown_cost_ops` (how many), `unknown_cost_targets` (count per target, an attention kernel
    counted as "splash attention"), `unknown_cost_flops` (the attention kernels' FLOPs), `unknown_cost_bytes`
    (the data-movement ops' and attention kernels' bytes), `unknown_cost_seconds` (their time: data movement
    at HBM bandwidth, each kernel at its roofline, `attention_kernel_cost`), `unaccounted` (targets whose cost
    cannot be read from the HLO; "unidentified" when the raw figure with every data-movement op's -1 added
    back is still not positive: some other instruction has no cost model) and `optimal_seconds`: the raw
    figure with each data-movement op's -1 added back plus the accounted time (-1 when still not positive)."""
    from kalm_jax.perf.flops import peak_for

    bandwidth, peak = HBM_BANDWIDTH[generation], peak_for(generation)
    targets: dict[str, int] = {}
    flops = moved = seconds = 0.0
    unaccounted: set[str] = set()
    for op in ops:
        kind = op.target
        if op.data_movement:
            moved += op.bytes
            seconds += op.bytes / bandwidth
        elif op.attention_kernel and peak:
            kind = "splash attention"
            f, b = attention_kernel_cost(op)
            flops, moved = flops + f, moved + b
            seconds += max(f / peak, b / bandwidth)
        else:
            unaccounted.add(op.target)
        targets[kind] = targets.get(kind, 0) + 1
    minus_ones = sum(op.data_movement for op in ops)
    secs = raw_seconds + minus_ones + seconds
    if raw_seconds + minus_ones <= 0 and not unaccounted:  # something else lacks a cost model
        unaccounted.add("unidentified")
    return {
        "unknown_cost_ops": len(ops),
        "unknown_cost_targets": targets,
        "unknown_cost_flops": flops,
        "unknown_cost_bytes": moved,
        "unknown_cost_seconds": seconds,
        "unaccounted": sorted(unaccounted),
        "optimal_seconds": secs if secs > 0 else -1.0,
    }


def mfu_note(row: Mapping, min_flops_ratio: float) -> str | None:
    """Why a cost row must not print an MFU (None: it may): unaccounted ops, or XLA's FLOPs short of the
    useful FLOPs (`flops_ratio` < `min_flops_ratio`: work the analysis does not see)."""
    if row.get("unaccounted"):
        return f"no MFU: {', '.join(row['unaccounted'])} without a cost model (FLOPs not in the analysis)"
    ratio = row.get("flops_ratio")
    if ratio is not None and ratio < min_flops_ratio:
        return (
            f"no MFU: XLA's analysis counts {100 * ratio:.0f}% of the useful FLOPs "
            "(the rest sits in instructions it does not cost)"
        )
    return None


def estimate_bytes(
    program: str,
    config,
    w,
    devices: int,
    tensor: int = 1,
    itemsize: int = 2,
    weight_itemsize: float | None = None,
    collectives: bool = True,
) -> float:
    """Analytic HBM bytes per chip of one engine call (`program` "encode" or "score") of the workload `w`
    (`aot.Workload`: `eval_batch` rows over `devices` chips, `tensor` of them sharing a row's heads / MLP),
    `itemsize`-byte activations and `weight_itemsize`-byte stack weights (default `itemsize`; 1 for int8 / fp8
    weights, whose per-channel scales are left out):

    * the stack's weights read once (split over `tensor`), and the embedding rows of the call's tokens;
    * per layer and token: the layer's input read and output written (2 x H), and each projection's output
      written once and read once (2 x (q / k / v + attention output + MLP gate / up), heads and MLP width
      over `tensor`); no attention scores (the splash kernel keeps them on chip);
    * score: the passage states read once per layer for their keys / values, whose projections are written
      and read like the prompt's.

    * under split weights (`tensor` > 1; `collectives`), what the tensor layout's collectives move for each of a
      layer's two sub-blocks, per token: with the encoder's sequence parallelism (`layers.splits_tokens`, as the
      engine runs it) the gathered input written (H) after the all-gather read the device's share (H / tensor),
      and the partial products of the row-parallel projection written (H) and read by the reduce-scatter (H),
      which writes the device's share (H / tensor); with whole tokens the partial products written (H) and
      all-reduced (read and written, 2 x H). The gathered input's read by the projections is the layer input's
      read above.

    What a program that keeps nothing else in HBM would read and write; `bytes_accessed` / this estimate
    is the report's `bytes_ratio`."""
    h, d, i = config.hidden_size, config.head_dim, config.intermediate_size
    n = -(-config.num_heads // tensor)
    k = config.num_kv_heads // tensor if config.num_kv_heads % tensor == 0 else config.num_kv_heads
    mlp = -(-i // tensor)
    rows = -(-w.eval_batch // (devices // tensor))
    proj = (n + 2 * k) * d + n * d + 2 * mlp  # q / k / v, attention output, gate / up
    per_token = 2 * h + 2 * proj
    weight_size = itemsize if weight_itemsize is None else weight_itemsize
    layer_weights = (h * (n + 2 * k) * d + n * d * h + 3 * h * mlp) * weight_size
    if program == "encode":
        tokens, layers = rows * w.passage_len, config.num_encoder_layers
        extra = 0
    elif program == "score":
        tokens, layers = rows * w.query_len, config.num_decoder_layers
        windows = -(-w.passage_len // w.ratio)
        extra = layers * rows * windows * (h + 2 * 2 * k * d) * itemsize
    else:
        raise ValueError(f"no bytes estimate for program {program!r}")
    if collectives and tensor > 1:
        from kalm_jax.model import layers as model_layers
        from kalm_jax.model.options import ModelOptions
        from kalm_jax.parallel.inference_policy import serving_options

        split = program == "encode" and model_layers.splits_tokens(
            config, serving_options(ModelOptions()), "tensor", tensor, w.passage_len
        )
        per_token += 2 * (3 * h + 2 * h / tensor) if split else 2 * 3 * h
    return float(layers * layer_weights + tokens * h * itemsize + layers * tokens * per_token * itemsize + extra)


__all__ = [
    "DATA_MOVEMENT",
    "KERNELS",
    "ATTENTION_KERNELS",
    "UNKNOWN_COST",
    "HBM_BANDWIDTH",
    "UnknownOp",
    "shape_bytes",
    "unknown_ops",
    "attention_kernel_cost",
    "account",
    "mfu_note",
    "estimate_bytes",
]
