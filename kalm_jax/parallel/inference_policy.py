"""The inference mesh policy: replicated weights on a data mesh, or weights split over a tensor axis.

`decide` picks, from the model config, the weights' dtype, the batch and the device memory, how an
`InferenceEngine` lays its weights out over its devices:

* ``replicated`` (``tensor = 1``): every device holds all the weights; a 1-axis ``("data",)`` mesh
  (`kalm_jax.parallel.mesh.data_mesh`) splits each batch over the devices. No collective runs in a call.
* ``tensor`` (``tensor = t > 1``): a ``("data", "fsdp", "tensor")`` mesh of ``(D / t, 1, t)``; each weight is
  split over ``tensor`` on its first dimension among vocab / heads / kv_heads / mlp (Megatron-style: q / k / v
  and gate / up by output columns, o / down by input rows), the batch over ``data``. Each device computes
  its heads and its slice of the MLP. The encoder runs Megatron-style sequence parallelism over ``tensor``
  (`sequence_axis`, `kalm_jax.model.layers.sequence_axis`): its residual stream, norms and adds hold 1/t of the
  tokens; each sub-block all-gathers its input's tokens (with their RMS statistics) before the projections and
  reduce-scatters the attention-output and down projections. The decoder all-reduces the [tokens, hidden]
  activations after those two projections instead. Besides the embedding lookup, these are the only
  collectives: no weight is ever all-gathered, unlike the training mesh's fsdp layout, which gathers every
  layer's weights per call.

``auto`` takes the layout with the fewest collectives whose weights plus the estimated working set of one batch
(`working_set_bytes`) take at most `FILL` of a device's memory: replicated weights first, then each tensor size (a
power of two that divides the device count and the number of query heads), smallest first. At each it tries the
batch asked for, then a smaller one (`capped_rows`) of at least `MIN_TOKENS` document tokens per batch shard, which
becomes the engine's batch (`InferencePolicy.rows`): such a batch already keeps the chips busy, and fewer
collectives beat a bigger batch (large on v5e-16: tensor 2 at 1,024 rows per call predicts 5% more passages and
14% more pairs per chip than tensor 4 at 2,048). When not even such a batch fits at any size, it takes the
smallest size with which the weights take at most half of that share (the engine retries smaller batches when
one runs out of memory). Device memory unknown (CPU): replicated. The
setting overrides it: an engine's ``weights=`` argument, else the ``KALM_INFERENCE_WEIGHTS`` environment
variable: ``auto``, ``replicated``, ``tensor`` (as ``auto`` without the replicated layout) or
``tensor:N``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from kalm_jax.model import fused_mlp, layers
from kalm_jax.model.options import ModelOptions
from kalm_jax.parallel.mesh import data_mesh, logical_to_spec, make_mesh, rules_dict

WEIGHTS_ENV = "KALM_INFERENCE_WEIGHTS"
MODES = ("auto", "replicated", "tensor")
FILL = 0.8
"""Share of a device's memory the weights and one batch's estimated working set may take."""
MIN_TOKENS = 16384
"""Document tokens per batch shard per call below which ``auto`` does not cap a batch to fit a layout, and tries the
next one (at 512-token passages: 32 rows per shard; a score call then holds 4,096 prompt tokens of 128 per shard,
several times what it takes for the weights' reads to hide behind the matmuls on a TPU)."""

TENSOR_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", "data"),
    ("vocab", "tensor"),
    ("embed", None),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("layers", None),
    ("lora_rank", None),
)
"""Logical-axis rules of the ``tensor`` layout (`kalm_jax.parallel.mesh.logical_to_spec` replicates a dimension the
tensor size does not divide, e.g. a single kv head)."""


@dataclasses.dataclass(frozen=True)
class InferencePolicy:
    """How an engine lays its weights out (see the module docstring).

    mode: "replicated" or "tensor". data, tensor: mesh sizes (data x tensor = devices). weight_bytes: the
    weights' bytes per device under this layout; working_bytes: the estimated per-device working set of one
    batch of `rows`; device_memory: bytes per device (None: unknown). setting: what was asked ("auto", ...).
    reason: why. rows: the batch (whole call) the layout is for: the one asked for, or less where ``auto``
    capped it to keep the weights replicated; asked: the batch asked for.
    """

    mode: str
    data: int
    tensor: int
    weight_bytes: int
    working_bytes: int
    device_memory: int | None
    setting: str
    reason: str
    rows: int
    asked: int

    @property
    def rules(self) -> dict[str, Any]:
        """Logical-axis rules of the weights (empty for replicated weights: every dimension whole)."""
        return {} if self.mode == "replicated" else rules_dict(TENSOR_RULES)

    @property
    def batch_axes(self) -> str:
        return "data"

    @property
    def setting_of_layout(self) -> str:
        """The setting that asks for this layout itself: "replicated" or "tensor:N"."""
        return "replicated" if self.mode == "replicated" else f"tensor:{self.tensor}"

    @property
    def sequence_axis(self) -> str | None:
        """The mesh axis the encoder splits its tokens over (`ModelOptions.sequence_parallel`): ``"tensor"`` when
        the weights are split over it, else None."""
        return "tensor" if self.mode == "tensor" else None

    def mesh(self, devices: Sequence[jax.Device]) -> Mesh:
        """The engine's mesh over `devices`: ``("data",)`` for replicated weights, else (data, 1, tensor)."""
        devices = list(devices)
        if self.data * self.tensor != len(devices):
            raise ValueError(f"policy data={self.data} x tensor={self.tensor} does not match {len(devices)} devices")
        if self.mode == "replicated":
            return data_mesh(devices)
        return make_mesh({"data": self.data, "fsdp": 1, "tensor": self.tensor}, devices)

    def shardings(self, state, mesh: Mesh):
        """NamedSharding per weight of an NNX `state` (arrays or ShapeDtypeStructs) on `mesh`."""
        return weight_shardings(state, mesh, self.rules)

    def describe(self) -> str:
        """One line: the layout, the mesh and the memory figures behind the decision."""
        gib = 2**30
        memory = "unknown" if self.device_memory is None else f"{self.device_memory / gib:.2f} GiB"
        layout = (
            f"weights replicated on a data mesh of {self.data}"
            if self.mode == "replicated"
            else f"weights split over tensor={self.tensor} (data={self.data})"
        )
        batch = f"batch {self.rows}" if self.rows == self.asked else f"batch {self.rows} (of {self.asked} asked)"
        return (
            f"inference mesh: {layout}; {batch}; per device {self.weight_bytes / gib:.2f} GiB weights + "
            f"~{self.working_bytes / gib:.2f} GiB working set, memory {memory} ({self.setting}: {self.reason})"
        )


def parse_setting(value: str | None) -> tuple[str, int | None]:
    """("auto" | "replicated" | "tensor", tensor size or None) from a setting string (None: the environment
    variable, else "auto"); ValueError for anything else."""
    raw = os.environ.get(WEIGHTS_ENV, "auto") if value is None else value
    text = str(raw).strip().lower() or "auto"
    mode, _, size = text.partition(":")
    if mode not in MODES or (size and mode != "tensor"):
        raise ValueError(f"inference weights setting {raw!r}: expected one of auto, replicated, tensor, tensor:N")
    if not size:
        return mode, None
    if not size.isdigit() or int(size) < 1:
        raise ValueError(f"inference weights setting {raw!r}: N in tensor:N must be a positive integer")
    return mode, int(size)


def _leaves(state) -> list[tuple[tuple[str | None, ...], tuple[int, ...], Any]]:
    from flax import nnx

    out = []
    for var in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, nnx.Variable)):
        value = var.get_value() if isinstance(var, nnx.Variable) else var
        axes = getattr(var, "out_sharding", None) or (None,) * len(value.shape)
        # a quantized weight (qwix.QArray) is several arrays (values, scales) under the weight's axes
        for leaf in jax.tree.leaves(value):
            out.append((tuple(axes), tuple(leaf.shape), np.dtype(leaf.dtype)))
    return out


def _sharding(var, mesh: Mesh, rules):
    """The NamedSharding of a weight's value (for a quantized weight, a `qwix.QArray` of them: its scales take
    the weight's axes too, a size-1 dimension replicated)."""
    value = var.get_value()
    if not rules:
        return jax.tree.map(lambda _: NamedSharding(mesh, PartitionSpec()), value)
    axes = getattr(var, "out_sharding", None) or (None,) * len(value.shape)
    return jax.tree.map(lambda leaf: NamedSharding(mesh, logical_to_spec(axes, leaf.shape, mesh, rules)), value)


def weight_shardings(state, mesh: Mesh, rules):
    """The NNX `state` with each weight's value replaced by its NamedSharding on `mesh` under `rules` (a weight's
    logical axes are its `out_sharding` metadata; no rules: every weight replicated): the same tree structure as
    `state`, for `jax.device_put(state, weight_shardings(...))`."""
    from flax import nnx

    return jax.tree.map(
        lambda v: v.replace(_sharding(v, mesh, rules)), state, is_leaf=lambda x: isinstance(x, nnx.Variable)
    )


def abstract_weights(state, mesh: Mesh, rules):
    """The NNX `state` with each weight a `jax.ShapeDtypeStruct` carrying its sharding (as `weight_shardings`)."""
    from flax import nnx

    def one(var):
        value = var.get_value()
        return var.replace(
            jax.tree.map(
                lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
                value,
                _sharding(var, mesh, rules),
            )
        )

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def weight_bytes(state, tensor: int) -> int:
    """Bytes per device of the weights of an NNX `state` split over `tensor` devices by `TENSOR_RULES` (the
    first vocab / heads / kv_heads / mlp dimension that `tensor` divides; 1: all of them)."""
    split = {name for name, target in TENSOR_RULES if target == "tensor"}
    total = 0
    for axes, shape, dtype in _leaves(state):
        n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if tensor > 1 and any(a in split and s % tensor == 0 for a, s in zip(axes, shape)):
            n //= tensor
        total += n
    return total


def serving_options(options: ModelOptions, tensor: bool = True, devices: Sequence[jax.Device] = ()) -> ModelOptions:
    """`options` as the engine runs the model: under the tensor layout (`tensor`) the encoder splits its tokens
    over ``tensor`` unless the options name an axis themselves; on TPU `devices` the options carry their
    generation's VMEM (`ModelOptions.tpu_vmem_bytes`, unless set) for the fused MLP."""
    if tensor and options.sequence_parallel is None:
        options = options.replace(sequence_parallel="tensor")
    devices = list(devices)
    if options.tpu_vmem_bytes is None and devices and devices[0].platform == "tpu":
        vmem = fused_mlp.vmem_capacity(devices[0].device_kind)
        options = options.replace(tpu_vmem_bytes=vmem) if vmem else options
    return options


def working_set_bytes(
    config,
    dtype,
    rows: int,
    document_len: int,
    prompt_len: int,
    tensor: int = 1,
    scores: bool = True,
    options: ModelOptions | None = None,
) -> int:
    """Estimated peak bytes per device of one encode or score call over `rows` rows of that device's batch
    shard (the larger of the two): the buffers of one layer (the layers run one at a time under a scan) for
    every token: the hidden states (input, normed, attention output, residual: 4 x H), q / k / v and the MLP's
    gate / up / product (heads and MLP width split over `tensor`), and the attention's scores of one query
    block of 512 rows in fp32 (only with `scores`: False where a fused kernel keeps them on chip,
    `dispatch.scores_stay_on_chip`); plus the inputs and the encoder's fp32 final states.

    Where the engine's encoder splits its tokens over `tensor` (the model's `options` as `serving_options` runs
    them, default `ModelOptions()`; `kalm_jax.model.layers.splits_tokens`) its hidden states and final states
    hold 1 / `tensor` of the tokens, and each sub-block adds its gathered input and its projection's
    partial sums over every token (2 x H).

    XLA:TPU's own temporaries for the engine's programs come to 0.4-0.8 of this (nano and large, replicated and
    split, 128 to 512 rows per batch shard; less still at fewer rows), so the estimate errs on the safe side."""
    itemsize = np.dtype(dtype).itemsize
    h, d = config.hidden_size, config.head_dim
    heads = -(-config.num_heads // tensor)
    kv = -(-config.num_kv_heads // tensor) if config.num_kv_heads % tensor == 0 else config.num_kv_heads
    mlp = -(-config.intermediate_size // tensor)
    split = layers.splits_tokens(config, serving_options(options or ModelOptions()), "tensor", tensor, document_len)
    share = tensor if split else 1

    def layer(tokens: int, keys: int, hidden: int) -> int:
        per_token = (hidden + (heads + 2 * kv) * d + 3 * mlp) * itemsize
        return tokens * per_token + (min(tokens, 512 * rows) * heads * keys * 4 if scores else 0)

    windows = document_len  # ratio 1: the most states the decoder can read
    keys = min(document_len, 2 * config.sliding_window + 1 or document_len)
    encode = layer(rows * document_len, keys, -(-4 * h // share) + (2 * h if split else 0))
    score = layer(rows * prompt_len, prompt_len + windows, 4 * h) + rows * windows * h * itemsize
    inputs = rows * (document_len + prompt_len) * 8 + -(-rows * document_len * h * 4 // share)
    return max(encode, score) + inputs


def _divisors(devices: int, config, want: int | None) -> list[int]:
    """Tensor sizes to try, smallest first: powers of two dividing the device count and the query heads."""
    if want is not None:
        return [want]
    sizes = [t for t in (2**i for i in range(1, 16)) if t <= devices and devices % t == 0]
    return [t for t in sizes if config.num_heads % t == 0]


def device_memory(devices: Sequence[jax.Device]) -> int | None:
    """Bytes per device (the smallest `bytes_limit` of `memory_stats`), None when the platform does not say
    (CPU)."""
    limits = []
    for d in devices:
        try:
            stats = d.memory_stats()
        except Exception:  # noqa: BLE001 - compile-only and CPU devices may not report
            stats = None
        if not stats or "bytes_limit" not in stats:
            return None
        limits.append(int(stats["bytes_limit"]))
    return min(limits) if limits else None


def decide(
    config,
    state,
    *,
    devices: int,
    rows: int,
    document_len: int,
    prompt_len: int,
    dtype,
    memory: int | None,
    setting: str | None = None,
    scores: bool = True,
    options: ModelOptions | None = None,
) -> InferencePolicy:
    """The layout for `devices` devices of `memory` bytes each (None: unknown) serving the model `config`
    with weights `state` (its dtypes are the weights' dtypes) in compute `dtype`, batches of `rows` rows
    (whole call), documents of `document_len` and decoder prompts of `prompt_len` tokens. `setting`: see
    `parse_setting`. `scores`: the attention writes its scores to device memory; `options`: the model's options
    (`working_set_bytes`). ValueError for a tensor size that does not divide the devices or the query heads."""
    mode, want = parse_setting(setting)
    label = setting if setting is not None else os.environ.get(WEIGHTS_ENV, "auto") or "auto"
    if want is not None and (devices % want or config.num_heads % want):
        raise ValueError(
            f"tensor:{want} must divide the {devices} devices and the {config.num_heads} query heads of the model"
        )

    def per_device(t: int, batch: int = rows) -> tuple[int, int]:
        shard_rows = -(-batch // (devices // t))
        working = working_set_bytes(config, dtype, shard_rows, document_len, prompt_len, t, scores, options)
        return weight_bytes(state, t), working

    def policy(t: int, reason: str, batch: int = rows) -> InferencePolicy:
        w, ws = per_device(t, batch)
        kind = "replicated" if t == 1 else "tensor"
        return InferencePolicy(kind, devices // t, t, w, ws, memory, str(label), reason, batch, rows)

    if mode == "replicated" or (mode == "tensor" and want == 1):
        return policy(1, "as set")
    if want is not None:
        return policy(want, "as set")
    budget = None if memory is None else FILL * memory

    def fits(t: int, batch: int = rows) -> bool:
        return budget is None or sum(per_device(t, batch)) <= budget

    if mode == "auto" and budget is None:
        return policy(1, "device memory unknown")
    sizes = _divisors(devices, config, want)
    if mode == "tensor" and not sizes:
        raise ValueError(
            f"no tensor size > 1 divides both the {devices} devices and the {config.num_heads} query heads"
        )
    # Fewest collectives first: replicated (auto only), then each tensor size, smallest first; at each, the
    # batch asked for, else the largest capped batch that still keeps the chips busy.
    for t in ([1] if mode == "auto" else []) + sizes:
        if fits(t):
            if t == 1:
                return policy(1, f"fits in {FILL:.0%} of device memory")
            return policy(t, "as set" if mode == "tensor" else f"replicated does not fit; tensor={t} does")
        capped = capped_rows(rows, devices // t, document_len, lambda batch, t=t: fits(t, batch))
        if capped is not None:
            shards = devices // t
            if t == 1:
                why = (
                    f"a batch of {rows} fits only split; one of {capped} ({capped // shards} per device) fits beside "
                    "replicated weights, so no call runs a collective"
                )
            else:
                why = (
                    f"a batch of {rows} fits only split wider; one of {capped} ({capped // shards} per batch shard) "
                    f"fits at tensor={t}, the fewest collectives"
                )
            return policy(t, why, capped)
    if not sizes:
        return policy(1, "does not fit, and no tensor size divides the devices and query heads")
    # the batch's working set fits at no size: leave the working set half the memory (the engine backs off)
    roomy = [t for t in sizes if budget is None or weight_bytes(state, t) <= budget / 2]
    t = min(roomy) if roomy else max(sizes)
    return policy(
        t,
        f"weights and a batch of {rows} rows fit at no tensor size; tensor={t} leaves the weights at most "
        "half of the budget (the engine retries smaller batches on out-of-memory)",
    )


def capped_rows(rows: int, shards: int, document_len: int, fits) -> int | None:
    """The largest batch below `rows` of a power of two rows per batch shard (`shards` of them), at least
    `MIN_TOKENS` document tokens per shard, for which ``fits(batch)``; None if there is none."""
    least = -(-MIN_TOKENS // document_len)
    per = 1 << max(0, (-(-rows // shards) - 1).bit_length() - 1)  # largest power of 2 below rows / shards, or 1
    while per >= least and per * shards < rows:
        if fits(per * shards):
            return per * shards
        per //= 2
    return None


def state_is_abstract(state) -> bool:
    """True when the weights are `jax.ShapeDtypeStruct`s (an engine that only lowers programs, e.g. for AOT)."""
    leaves = jax.tree.leaves(state)
    return bool(leaves) and all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)


__all__ = [
    "WEIGHTS_ENV",
    "MODES",
    "FILL",
    "MIN_TOKENS",
    "TENSOR_RULES",
    "InferencePolicy",
    "parse_setting",
    "weight_shardings",
    "abstract_weights",
    "weight_bytes",
    "working_set_bytes",
    "capped_rows",
    "device_memory",
    "decide",
    "state_is_abstract",
]
