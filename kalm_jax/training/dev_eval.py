"""Periodic dev evaluation during training: nDCG@10 of reranking BM25 candidates.

Metrics come from `kalm_jax.evaluation.metrics.evaluate` (pytrec_eval, averaged over all judged queries).
The dev set
is built once (BM25 top-`depth` candidates of the first `num_queries` judged queries, tokenized), then each
evaluation encodes the candidate passages once at the evaluation ratio and scores every pair.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np

from kalm_jax import prompts, scoring
from kalm_jax.data.beir import load_beir
from kalm_jax.data.bm25 import BM25Index
from kalm_jax.model import T5Gemma2
from kalm_jax.tokenizer import Tokenizer

log = logging.getLogger(__name__)


@dataclasses.dataclass
class DevSet:
    """Tokenized dev pairs: unique passages, decoder prompts, and which (query, passage) each pair is."""

    qrels: dict[str, dict[str, int]]
    first_stage: dict[str, dict[str, float]]
    doc_ids: list[str]
    enc_ids: np.ndarray   # [P, S]
    enc_mask: np.ndarray  # [P, S]
    query_ids: list[str]
    dec_ids: np.ndarray   # [Q, T]
    dec_mask: np.ndarray  # [Q, T]
    pairs: np.ndarray     # [N, 2] (query row, passage row)

    @classmethod
    def build(cls, dataset_dir: str | Path, split: str, tokenizer: Tokenizer, *, num_queries: int, depth: int,
              passage_max_tokens: int, query_max_tokens: int, instruction: str | bool | None = None) -> DevSet:
        ds = load_beir(dataset_dir, split)
        qids = sorted(ds.qrels)[:num_queries]
        index = BM25Index.build(ds.corpus, show_progress=False)
        run = index.search({q: ds.queries[q] for q in qids}, k=depth, show_progress=False)
        doc_ids = sorted({d for q in qids for d in run.get(q, {})})
        row = {d: i for i, d in enumerate(doc_ids)}
        enc_ids, enc_mask = prompts.tokenize_documents(tokenizer, [ds.passage(d) for d in doc_ids],
                                                       passage_max_tokens, pad_to_multiple_of=8)
        dec_ids, dec_mask = prompts.tokenize_decoder_prompts(tokenizer, [ds.queries[q] for q in qids], instruction,
                                                             query_max_tokens=query_max_tokens)
        pairs = np.asarray([(i, row[d]) for i, q in enumerate(qids) for d in run.get(q, {})], np.int64)
        return cls({q: ds.qrels[q] for q in qids}, {q: run.get(q, {}) for q in qids}, doc_ids, enc_ids, enc_mask,
                   qids, dec_ids, dec_mask, pairs)

    def rerank(self, model: T5Gemma2, tokenizer: Tokenizer, *, ratio: int, batch_size: int = 64
               ) -> dict[str, dict[str, float]]:
        """The reranked run {qid: {docid: margin}}."""
        states, pmask = [], []
        for i in range(0, len(self.doc_ids), batch_size):
            s, m, _ = scoring.encode_passages(model, self.enc_ids[i:i + batch_size], self.enc_mask[i:i + batch_size],
                                              ratio)
            states.append(s)
            pmask.append(m)
        width = max(s.shape[1] for s in states)
        states = np.concatenate([np.pad(s, ((0, 0), (0, width - s.shape[1]), (0, 0))) for s in states])
        pmask = np.concatenate([np.pad(m, ((0, 0), (0, width - m.shape[1]))) for m in pmask])
        margins = np.empty(len(self.pairs), np.float32)
        for i in range(0, len(self.pairs), batch_size):
            q, p = self.pairs[i:i + batch_size, 0], self.pairs[i:i + batch_size, 1]
            margins[i:i + batch_size] = scoring.score(model, self.dec_ids[q], self.dec_mask[q], states[p], pmask[p],
                                                      tokenizer.yes_id, tokenizer.no_id)
        run: dict[str, dict[str, float]] = {q: {} for q in self.query_ids}
        for (q, p), m in zip(self.pairs, margins):
            run[self.query_ids[q]][self.doc_ids[p]] = float(m)
        return run

    def ndcg10(self, run: dict[str, dict[str, float]]) -> float:
        from kalm_jax.evaluation.metrics import evaluate

        return float(evaluate(self.qrels, run)["ndcg_cut_10"])

    def evaluate(self, model: T5Gemma2, tokenizer: Tokenizer, *, ratio: int, batch_size: int = 64) -> dict[str, float]:
        """{"dev_ndcg@10": reranked, "dev_bm25_ndcg@10": first stage}."""
        return {"dev_ndcg@10": self.ndcg10(self.rerank(model, tokenizer, ratio=ratio, batch_size=batch_size)),
                "dev_bm25_ndcg@10": self.ndcg10(self.first_stage)}


__all__ = ["DevSet"]
