"""AOT/TPU launch settings per (model preset, TPU slice): `--config=configs/tpu.py:<preset>,<topology>`.

Keys follow the training config (`configs/train.py`, kalm_jax.training.config): model.*, data.*, mesh.*,
eval.*. Global batch 128 queries x group 16 (2048 passages of 512 tokens, prompts of 128 tokens).
Mesh choice: the models are small next to a slice's HBM, so parameters and optimizer state are fully
sharded over `fsdp` (ZeRO-3 style) and the batch over data x fsdp. The train step splits the batch by
query, so at most 128 batch shards: v5e-256 uses fsdp 128 x tensor 2 (query heads split in two;
kv_heads = 1 for nano/small stays replicated), v5p-128 (64 chips) uses fsdp 64.
"""

import ml_collections

from kalm_jax.training.config import default_config

# (preset, topology) -> (data, fsdp, tensor)
MESH = {
    ("tiny", "v5e-4"): (1, 4, 1),
    ("nano", "v5e-256"): (1, 128, 2),
    ("nano", "v5p-128"): (1, 64, 1),
    ("small", "v5e-256"): (1, 128, 2),
    ("small", "v5p-128"): (1, 64, 1),
    ("large", "v5e-256"): (1, 128, 2),
    ("large", "v5p-128"): (1, 64, 1),
}


def get_config(arg: str = "nano,v5e-256") -> ml_collections.ConfigDict:
    preset, _, topology = arg.partition(",")
    c = default_config()  # the training config (kalm_jax.training.config), full fine-tuning
    c.model.update(preset=preset, param_dtype="float32", compute_dtype="bfloat16", remat=True)
    c.lora.enabled = False
    c.data.update(batch_size=128, group_size=16, passage_max_tokens=512, query_max_tokens=128,
                  decoder_length=192)  # prompt overhead + 128 query tokens, as configs/train.py
    c.eval.update(ratio=4, batch_size=2048)
    data, fsdp, tensor = MESH.get((preset, topology), (-1, 1, 1))
    # Every weight gets one dimension on fsdp: the first of embed / vocab / mlp / head_dim that the fsdp
    # size divides (embed 640 or 1152 does not split 256 ways; mlp and head_dim do).
    c.logical_axis_rules = (
        ("batch", ("data", "fsdp")), ("vocab", "fsdp"), ("embed", "fsdp"), ("mlp", "fsdp"),
        ("head_dim", "fsdp"), ("heads", "tensor"), ("kv_heads", None), ("layers", None), ("lora_rank", None),
    )
    c.mesh = ml_collections.ConfigDict(dict(data=data, fsdp=fsdp, tensor=tensor))
    if preset == "tiny":  # a CPU-test-sized workload
        c.data.update(batch_size=4, group_size=2, passage_max_tokens=64, query_max_tokens=16, decoder_length=16)
        c.mep.ratios = (1, 4)
        c.eval.batch_size = 8
    return c
