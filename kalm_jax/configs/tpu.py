"""AOT/TPU launch settings per (model preset, TPU slice): `--config=tpu.py:<preset>,<topology>[,<slices>]`.

Keys follow the training config (`train.py`, kalm_jax.training.config): model.*, data.*, mesh.*, eval.*.
Global batch 128 queries x group 16 (2048 passages of 512 tokens, prompts of 128 tokens). The mesh, the
logical-axis rules and the remat policy are derived for the slice by `kalm_jax.perf.planning.plan_for_slice`;
the optional third argument is the number of slices (as aot's `--num_slices`).
"""

import ml_collections

from kalm_jax.perf.planning import plan_for_slice
from kalm_jax.training.config import default_config

BATCH_QUERIES = 128


def get_config(arg: str = "nano,v5e-256") -> ml_collections.ConfigDict:
    preset, topology, *rest = [a.strip() for a in arg.split(",")] + [""]
    num_slices = int(rest[0]) if rest and rest[0] else 1
    c = default_config()  # the training config (kalm_jax.training.config), full fine-tuning
    c.model.update(preset=preset, param_dtype="float32", compute_dtype="bfloat16", remat=True)
    c.lora.enabled = False
    c.data.update(
        batch_size=BATCH_QUERIES, group_size=16, max_document_tokens=512, max_query_tokens=128, decoder_length=192
    )  # prompt overhead + 128 query tokens, as train.py
    c.eval.update(ratio=4, batch_size=2048)
    if preset == "tiny":  # a CPU-test-sized workload
        c.data.update(batch_size=4, group_size=2, max_document_tokens=64, max_query_tokens=16, decoder_length=64)
        c.mep.ratios = (1, 4)
        c.eval.batch_size = 8
    return plan_for_slice(c, topology, num_slices)
