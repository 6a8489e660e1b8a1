"""AOT/TPU launch settings per (model preset, TPU slice): `--config=configs/tpu.py:<preset>,<topology>[,<slices>]`.

Keys follow the training config (`configs/train.py`, kalm_jax.training.config): model.*, data.*, mesh.*,
eval.*. Global batch 128 queries x group 16 (2048 passages of 512 tokens, prompts of 128 tokens).

Mesh choice (`derive_mesh`, any v4/v5e/v5p/v6e slice): the models are small next to a slice's HBM, so
parameters and optimizer state are fully sharded over `fsdp` (ZeRO-3 style) and the batch over
data x fsdp. The train step splits the batch by query, so at most `data.batch_size` (128) batch shards:
`fsdp` spans the slice up to that, and larger slices split the query heads over `tensor`
(v5e-256: fsdp 128 x tensor 2; v5p-128, i.e. 64 chips: fsdp 64; v5e-16: fsdp 16). With several slices
(the optional third argument, the same number as aot's `--num_slices`), `data` spans the slices (DCN)
and each slice is meshed as above.
"""

import ml_collections

from kalm_jax.training.config import default_config

BATCH_QUERIES = 128


def derive_mesh(chips: int, batch_shards: int = BATCH_QUERIES, num_slices: int = 1) -> tuple[int, int, int]:
    """(data, fsdp, tensor) for `num_slices` slices of `chips` devices each: fsdp over the slice up to the
    number of batch shards the global batch allows (per slice), then tensor for the rest of the slice."""
    per_slice = max(1, batch_shards // num_slices)
    fsdp = 1
    while fsdp * 2 <= min(chips, per_slice) and chips % (fsdp * 2) == 0:
        fsdp *= 2
    return num_slices, fsdp, chips // fsdp


def qkv_remat_bytes(model, queries_per_chip: int, group: int, passage_len: int, decoder_len: int,
                    ratios: tuple[int, ...], tensor: int) -> int:
    """Estimated bytes per chip that remat policy "qkv" keeps: the bf16 q / k / v projections of every layer
    (query heads split over `tensor`, kv heads whole) for the encoder's passages, the decoder's prompts
    (one pass per MEP ratio) and the passage windows the decoder projects to keys / values."""
    q, kv = -(-model.num_heads // tensor) * model.head_dim, 2 * model.num_kv_heads * model.head_dim
    pairs = queries_per_chip * group
    enc = model.num_encoder_layers * pairs * passage_len * (q + kv)
    windows = pairs * sum(-(-passage_len // r) for r in ratios)
    dec = model.num_decoder_layers * (pairs * decoder_len * len(ratios) * (q + kv) + windows * kv)
    return 2 * (enc + dec)


def mlp_out_remat_bytes(model, queries_per_chip: int, group: int, passage_len: int, decoder_len: int,
                        ratios: tuple[int, ...]) -> int:
    """Estimated bytes per chip that keeping the MLP down projections' outputs ("mlp_out") adds: bf16
    [tokens, hidden] per layer, the encoder's passages and the decoder's prompts (one pass per MEP ratio)."""
    pairs = queries_per_chip * group
    tokens = (model.num_encoder_layers * pairs * passage_len
              + model.num_decoder_layers * pairs * decoder_len * len(ratios))
    return 2 * tokens * model.hidden_size


def encoder_mlp_in_remat_bytes(model, queries_per_chip: int, group: int, passage_len: int, tensor: int) -> int:
    """Estimated bytes per chip that keeping the encoder's MLP gate / up ("mlp_in") adds: bf16
    [tokens, intermediate / tensor] twice per encoder layer for the chip's passages."""
    tokens = model.num_encoder_layers * queries_per_chip * group * passage_len
    return 2 * tokens * 2 * -(-model.intermediate_size // tensor)


def get_config(arg: str = "nano,v5e-256") -> ml_collections.ConfigDict:
    from kalm_jax.aot import tpu_slice

    preset, topology, *rest = [a.strip() for a in arg.split(",")] + [""]
    num_slices = int(rest[0]) if rest and rest[0] else 1
    c = default_config()  # the training config (kalm_jax.training.config), full fine-tuning
    c.model.update(preset=preset, param_dtype="float32", compute_dtype="bfloat16", remat=True)
    c.lora.enabled = False
    c.data.update(batch_size=BATCH_QUERIES, group_size=16, max_document_tokens=512, max_query_tokens=128,
                  decoder_length=192)  # prompt overhead + 128 query tokens, as configs/train.py
    c.eval.update(ratio=4, batch_size=2048)
    if preset == "tiny":  # a CPU-test-sized workload
        c.data.update(batch_size=4, group_size=2, max_document_tokens=64, max_query_tokens=16, decoder_length=16)
        c.mep.ratios = (1, 4)
        c.eval.batch_size = 8
    data, fsdp, tensor = derive_mesh(tpu_slice(topology).chips, int(c.data.batch_size), num_slices)
    # Every weight gets one dimension on fsdp: the first of embed / vocab / mlp / head_dim that the fsdp
    # size divides. With tensor > 1 the MLP width splits over tensor as well as the query heads
    # (Megatron-style): the tensor pair holds the same batch shard, so an MLP kept whole on tensor is
    # computed twice (small on v5e-256: ~90% of the linear FLOPs; docs/tpu.md, "Train step"). The MLP
    # weights keep fsdp on embed (gate / up [embed, mlp], down [mlp, embed] alike), so the down projection's
    # gradient is a local matmul and a reduce-scatter; with mlp first on fsdp as well, XLA moved the MLP
    # activations by all-to-all in the backward pass (2.6 ms per layer on the v5e-256 proxy). When the
    # fsdp size does not divide embed, mlp takes fsdp too. tensor = 1 meshes are unchanged (size-1 axes
    # are skipped).
    from kalm_jax.config import get_preset

    model = get_preset(preset)
    mlp = "tensor" if model.hidden_size % fsdp == 0 else ("fsdp", "tensor")
    c.logical_axis_rules = (
        ("batch", ("data", "fsdp")), ("vocab", "fsdp"), ("embed", "fsdp"), ("mlp", mlp),
        ("head_dim", "fsdp"), ("heads", "tensor"), ("kv_heads", None), ("layers", None), ("lora_rank", None),
    )
    c.mesh = ml_collections.ConfigDict(dict(data=data, fsdp=fsdp, tensor=tensor))
    # What remat keeps (docs/tpu.md "Train step"), by the estimates above, most time saved per byte first:
    # the q / k / v projections when they take at most 1/8 of HBM (XLA's plan holds about twice the
    # estimate), then the down projections' outputs and the encoder's gate / up while all kept take at
    # most 3/8 (small on v5e-256: 1.7, 1.5 and 2.7 GiB estimated, the program 13.8 of 16 GiB). The
    # gate / up of both stacks (the decoder: six prompt passes per passage) needed 20.3 GiB there.
    queries_per_chip = max(1, int(c.data.batch_size) // (data * fsdp))
    group, passage_len, dec_len = int(c.data.group_size), int(c.data.max_document_tokens), int(c.data.decoder_length)
    ratios = tuple(c.mep.ratios)
    qkv = qkv_remat_bytes(model, queries_per_chip, group, passage_len, dec_len, ratios, tensor)
    mlp_out = mlp_out_remat_bytes(model, queries_per_chip, group, passage_len, dec_len, ratios)
    mlp_in = encoder_mlp_in_remat_bytes(model, queries_per_chip, group, passage_len, tensor)
    hbm = tpu_slice(topology).hbm_bytes
    if qkv > hbm / 8:
        c.model.remat_policy = "nothing"
    elif qkv + mlp_out + mlp_in <= 3 / 8 * hbm:
        c.model.remat_policy = "encoder:qkv+mlp_in+mlp_out,decoder:qkv+mlp_out"
    elif qkv + mlp_out <= 3 / 8 * hbm:
        c.model.remat_policy = "qkv+mlp_out"
    else:
        c.model.remat_policy = "qkv"
    return c
