"""Training layout for a TPU slice: mesh, logical-axis rules and remat policy, derived from the model and the slice.

`plan_for_slice(config, topology, num_slices)` fills ``config.mesh``, ``config.logical_axis_rules`` and
``config.model.remat_policy`` of a training config (`kalm_jax.training.config`) for `num_slices` slices of
`topology`; `kalm_jax/configs/tpu.py` calls it after setting the workload's values.

Mesh (`derive_mesh`, any v4/v5e/v5p/v6e slice): the models are small next to a slice's HBM, so parameters and
optimizer state are fully sharded over `fsdp` (ZeRO-3 style) and the batch over data x fsdp. The train step
splits the batch by query, so there are at most `data.batch_size` batch shards: `fsdp` spans the slice up to
that, and larger slices split the query heads over `tensor` (v5e-256 with 128 queries: fsdp 128 x tensor 2;
64 chips: fsdp 64; v5e-16: fsdp 16). With several slices `data` spans the slices (DCN) and each slice is
meshed as above.
"""

from __future__ import annotations

from typing import Any


def derive_mesh(chips: int, batch_shards: int, num_slices: int = 1) -> tuple[int, int, int]:
    """(data, fsdp, tensor) for `num_slices` slices of `chips` devices each: fsdp over the slice up to the
    number of batch shards the global batch allows (per slice), then tensor for the rest of the slice."""
    per_slice = max(1, batch_shards // num_slices)
    fsdp = 1
    while fsdp * 2 <= min(chips, per_slice) and chips % (fsdp * 2) == 0:
        fsdp *= 2
    return num_slices, fsdp, chips // fsdp


def qkv_remat_bytes(
    model, queries_per_chip: int, group: int, passage_len: int, decoder_len: int, ratios: tuple[int, ...], tensor: int
) -> int:
    """Estimated bytes per chip that remat policy "qkv" keeps: the bf16 q / k / v projections of every layer
    (query heads split over `tensor`, kv heads whole) for the encoder's passages, the decoder's prompts
    (one pass per MEP ratio) and the passage windows the decoder projects to keys / values."""
    q, kv = -(-model.num_heads // tensor) * model.head_dim, 2 * model.num_kv_heads * model.head_dim
    pairs = queries_per_chip * group
    enc = model.num_encoder_layers * pairs * passage_len * (q + kv)
    windows = pairs * sum(-(-passage_len // r) for r in ratios)
    dec = model.num_decoder_layers * (pairs * decoder_len * len(ratios) * (q + kv) + windows * kv)
    return 2 * (enc + dec)


def mlp_out_remat_bytes(
    model, queries_per_chip: int, group: int, passage_len: int, decoder_len: int, ratios: tuple[int, ...]
) -> int:
    """Estimated bytes per chip that keeping the MLP down projections' outputs ("mlp_out") adds: bf16
    [tokens, hidden] per layer, the encoder's passages and the decoder's prompts (one pass per MEP ratio)."""
    pairs = queries_per_chip * group
    tokens = model.num_encoder_layers * pairs * passage_len + model.num_decoder_layers * pairs * decoder_len * len(
        ratios
    )
    return 2 * tokens * model.hidden_size


def encoder_mlp_in_remat_bytes(model, queries_per_chip: int, group: int, passage_len: int, tensor: int) -> int:
    """Estimated bytes per chip that keeping the encoder's MLP gate / up ("mlp_in") adds: bf16
    [tokens, intermediate / tensor] twice per encoder layer for the chip's passages."""
    tokens = model.num_encoder_layers * queries_per_chip * group * passage_len
    return 2 * tokens * 2 * -(-model.intermediate_size // tensor)


def logical_axis_rules(model, fsdp: int) -> tuple[tuple[str, Any], ...]:
    """Every weight gets one dimension on fsdp: the first of embed / vocab / mlp / head_dim that the fsdp
    size divides. With tensor > 1 the MLP width splits over tensor as well as the query heads
    (Megatron-style): the tensor pair holds the same batch shard, so an MLP kept whole on tensor would be
    computed twice. The MLP weights keep fsdp on embed (gate / up [embed, mlp], down [mlp, embed] alike), so
    the down projection's gradient is a local matmul and a reduce-scatter; with mlp first on fsdp as well,
    XLA moves the MLP activations by all-to-all in the backward pass. When the fsdp size does not divide
    embed, mlp takes fsdp too. Size-1 mesh axes are skipped, so tensor = 1 meshes are unaffected."""
    mlp = "tensor" if model.hidden_size % fsdp == 0 else ("fsdp", "tensor")
    return (
        ("batch", ("data", "fsdp")),
        ("vocab", "fsdp"),
        ("embed", "fsdp"),
        ("mlp", mlp),
        ("head_dim", "fsdp"),
        ("heads", "tensor"),
        ("kv_heads", None),
        ("layers", None),
        ("lora_rank", None),
    )


def remat_policy(
    model,
    *,
    queries_per_chip: int,
    group: int,
    passage_len: int,
    decoder_len: int,
    ratios: tuple[int, ...],
    tensor: int,
    hbm_bytes: int,
) -> str:
    """What remat keeps, by the estimates above, most time saved per byte first: the q / k / v projections
    when they take at most 1/8 of HBM (XLA's plan holds about twice the estimate), then the down
    projections' outputs and the encoder's gate / up while all kept take at most 3/8 of HBM."""
    qkv = qkv_remat_bytes(model, queries_per_chip, group, passage_len, decoder_len, ratios, tensor)
    mlp_out = mlp_out_remat_bytes(model, queries_per_chip, group, passage_len, decoder_len, ratios)
    mlp_in = encoder_mlp_in_remat_bytes(model, queries_per_chip, group, passage_len, tensor)
    if qkv > hbm_bytes / 8:
        return "nothing"
    if qkv + mlp_out + mlp_in <= 3 / 8 * hbm_bytes:
        return "encoder:qkv+mlp_in+mlp_out,decoder:qkv+mlp_out"
    if qkv + mlp_out <= 3 / 8 * hbm_bytes:
        return "qkv+mlp_out"
    return "qkv"


def plan_for_slice(c, topology: str, num_slices: int = 1):
    """Sets ``c.mesh``, ``c.logical_axis_rules`` and ``c.model.remat_policy`` of the training config `c` for
    `num_slices` slices of `topology` (e.g. "v5e-256"), from its model preset and data shapes; returns `c`."""
    import ml_collections

    from kalm_jax.model.config import get_preset
    from kalm_jax.perf.aot import tpu_slice

    tpu = tpu_slice(topology)
    data, fsdp, tensor = derive_mesh(tpu.chips, int(c.data.batch_size), num_slices)
    model = get_preset(c.model.preset)
    c.logical_axis_rules = logical_axis_rules(model, fsdp)
    c.mesh = ml_collections.ConfigDict(dict(data=data, fsdp=fsdp, tensor=tensor))
    c.model.remat_policy = remat_policy(
        model,
        queries_per_chip=max(1, int(c.data.batch_size) // (data * fsdp)),
        group=int(c.data.group_size),
        passage_len=int(c.data.max_document_tokens),
        decoder_len=int(c.data.decoder_length),
        ratios=tuple(c.mep.ratios),
        tensor=tensor,
        hbm_bytes=tpu.hbm_bytes,
    )
    return c


__all__ = [
    "derive_mesh",
    "qkv_remat_bytes",
    "mlp_out_remat_bytes",
    "encoder_mlp_in_remat_bytes",
    "logical_axis_rules",
    "remat_policy",
    "plan_for_slice",
]
