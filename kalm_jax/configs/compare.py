"""Settings of `kalm-compare BASE OTHER`: compare two evaluation output directories cell by cell (nDCG@10 of each,
per-query rank correlation of the reranked lists, margin error; kalm_jax.evaluation.compare)."""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.base_dir = ""  # the reference eval output directory, e.g. float weights (positional)
    c.other_dir = ""  # the eval output directory compared with it, e.g. --config.quantization=int8 (positional)
    c.base_label = ""  # column label of BASE; default: its quantization and dtype from sweep_config.json
    c.other_label = ""  # column label of OTHER; same default
    c.output = ""  # also write the table (markdown) to this file, and the rows as JSON beside it (.json)
    return c
