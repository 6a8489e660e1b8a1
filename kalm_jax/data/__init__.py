"""Data: BEIR datasets, TREC runs, training JSONL, BM25 first stage, hard negatives, TFDS/Grain input."""
