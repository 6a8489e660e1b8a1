"""Settings of `kalm-tfds-build --config.KEY=VALUE ...`: reranker training JSONL prepared into
TFDS array_record under data_dir/kalm_reranker_training/<name>/1.0.0."""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.train = ()  # training JSONL files of the train split, e.g. "a.jsonl,b.jsonl.gz" (required)
    c.validation = ()  # optional validation JSONL files
    c.data_dir = ""  # TFDS data directory (required)
    c.name = "default"  # dataset (builder config) name
    c.on_error = "raise"  # malformed training lines: raise | skip (counted)
    c.overwrite = False  # replace a dataset of this name prepared from other inputs
    return c
