"""Settings of `kalm-negatives --config.KEY=VALUE ...`: BM25 (or a given first-stage run) hard
negatives mined from a BEIR split into reranker training JSONL."""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.data_dir = ""  # directory holding BEIR dataset folders (required)
    c.dataset = ""  # dataset folder under data_dir, e.g. scifact (required)
    c.split = "train"  # qrels split whose queries become training examples
    c.out = ""  # training JSONL to write, .jsonl or .jsonl.gz (required)
    c.run = ""  # first-stage TREC run to mine from; "" = build BM25 here
    c.save_run = ""  # also write the BM25 run built here ("" = don't)
    c.depth = 100  # BM25 depth when no run is given (at least sample_end)
    c.num_negatives = 15  # negatives drawn per query (without replacement)
    c.sample_start = 0  # first rank (0-based) negatives are drawn from
    c.sample_end = 100  # end rank (exclusive) negatives are drawn from
    c.seed = 0  # draws are deterministic from (seed, query id)
    c.min_positive_score = 1  # qrels grade at which a document is a positive
    c.prompt = ""  # task instruction stored as each example's 'prompt' ("" = none)
    c.on_error = "raise"  # malformed input lines: raise | skip (counted)
    c.on_missing = "raise"  # qrels naming a missing query/document: raise | keep | drop
    return c
