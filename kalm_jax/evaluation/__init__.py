"""Evaluation: trec_eval metrics, the passage-state store, reranking over cached states, sweeps, reports."""
