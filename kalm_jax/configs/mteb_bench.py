"""`python -m kalm_jax.mteb.bench`: the MTEB adapter against the naive per-pair path on local tasks (one run).

Example:
  python -m kalm_jax.mteb.bench --config.checkpoint=CKPT --config.data_dir=DATA --config.datasets=scifact,adi \
      --config.max_queries=20 --config.out=row.json
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.checkpoint = ""  # any checkpoint kalm_jax.checkpoints.loader.load reads (required)
    c.dtype = ""  # float32 | bfloat16; empty = float32 on CPU, bfloat16 on accelerators
    c.data_dir = ""  # directory holding BEIR dataset folders (required)
    c.datasets = "scifact"  # comma-separated local tasks (kalm_jax.mteb.local_task)
    c.split = "test"
    c.first_stage = "bm25"
    c.top_k = 100  # candidates per query
    c.max_queries = 20  # judged queries per dataset (0 = all)
    c.ratio = 4
    c.max_query_tokens = 512
    c.max_document_tokens = 1024
    c.batch_size = 32  # the naive path's pairs per step (the released wrapper's) and documents per encoder call
    c.score_batch_size = 256  # the adapter's pairs per decoder call
    c.out = ""  # optional: the rows as JSON
    return c
