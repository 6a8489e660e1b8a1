"""Settings of `kalm-report OUTPUT_DIR`: regenerate an evaluation output directory's summary.md, results.csv and
plots from its results.jsonl."""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.output_dir = ""  # the evaluation output directory holding results.jsonl (positional)
    return c
