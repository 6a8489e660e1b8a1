"""Settings of `kalm-bm25 --config.KEY=VALUE ...`: a BM25 top-k TREC run over a BEIR dataset
(bm25s, English stop words, Snowball stemming), scored with nDCG@10 and R@100 against the split's qrels."""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.data_dir = ""  # directory holding BEIR dataset folders (required)
    c.dataset = ""  # dataset folder name under data_dir, e.g. scifact (required)
    c.split = "test"  # qrels split to retrieve for
    c.k = 100  # documents per query in the run
    c.k1 = 0.9  # BM25 k1 (Anserini/Pyserini default)
    c.b = 0.4  # BM25 b (Anserini/Pyserini default)
    c.out = ""  # run file to write, .trec or .trec.gz (required)
    c.tag = "bm25"  # run tag (TREC column 6)
    c.on_missing = "keep"  # qrels naming a missing query/document: raise | keep | drop
    return c
