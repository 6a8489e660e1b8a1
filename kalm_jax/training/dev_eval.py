"""Periodic dev evaluation during training: nDCG@10 of reranking BM25 candidates.

Metrics come from `kalm_jax.evaluation.metrics.evaluate` (pytrec_eval, averaged over all judged queries).
The dev set
is built once (BM25 top-`depth` candidates of the first `num_queries` judged queries, tokenized), then each
evaluation encodes the candidate passages once at the evaluation ratio and scores every pair, both through
the inference engine (`kalm_jax.inference.engine.InferenceEngine`) over the current weights.

During training (`mesh=` the training mesh) the engine scores with the training state's own arrays, sharded
as training shards them: no copy of the weights is made and none reaches a host. Each engine call is one
SPMD program over the whole mesh: every process builds the same dev set and makes the same calls, the rows of
every batch (passages, then (query, passage) pairs) are split over the mesh's batch axes, so each process's
devices encode and score only their rows, and the margins are gathered to every process. The metrics equal a
one-process run's.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from jax.sharding import Mesh

from kalm_jax.data.beir import load_beir
from kalm_jax.data.bm25 import BM25Index
from kalm_jax.inference.engine import InferenceEngine
from kalm_jax.model.t5gemma2 import T5Gemma2
from kalm_jax.text import prompts
from kalm_jax.text.hf_json import AnyTokenizer

log = logging.getLogger(__name__)


@dataclasses.dataclass
class DevSet:
    """Tokenized dev pairs: unique passages, decoder prompts, and which (query, passage) each pair is."""

    qrels: dict[str, dict[str, int]]
    first_stage: dict[str, dict[str, float]]
    doc_ids: list[str]
    doc_tokens: list[list[int]]  # encoder token ids per passage (prefix included, cut to the limit)
    query_ids: list[str]
    prompt_tokens: list[list[int]]  # decoder prompt token ids per query
    pairs: np.ndarray  # [N, 2] (query row, passage row)
    max_document_tokens: int = 512

    @classmethod
    def build(
        cls,
        dataset_dir: str | Path,
        split: str,
        tokenizer: AnyTokenizer,
        *,
        num_queries: int,
        depth: int,
        max_document_tokens: int,
        max_query_tokens: int,
        instruction: str | bool | None = None,
    ) -> DevSet:
        ds = load_beir(dataset_dir, split)
        qids = sorted(ds.qrels)[:num_queries]
        index = BM25Index.build(ds.corpus, show_progress=False)
        run = index.search({q: ds.queries[q] for q in qids}, k=depth, show_progress=False)
        doc_ids = sorted({d for q in qids for d in run.get(q, {})})
        row = {d: i for i, d in enumerate(doc_ids)}
        doc_tokens = [prompts.encode_document(tokenizer, ds.passage(d), max_document_tokens) for d in doc_ids]
        prompt_tokens = [
            prompts.encode_decoder_prompt(tokenizer, ds.queries[q], instruction, None, max_query_tokens) for q in qids
        ]
        pairs = np.asarray([(i, row[d]) for i, q in enumerate(qids) for d in run.get(q, {})], np.int64).reshape(-1, 2)
        return cls(
            {q: ds.qrels[q] for q in qids},
            {q: run.get(q, {}) for q in qids},
            doc_ids,
            doc_tokens,
            qids,
            prompt_tokens,
            pairs,
            max_document_tokens,
        )

    def rerank(
        self,
        model: T5Gemma2,
        tokenizer: AnyTokenizer,
        *,
        ratio: int,
        batch_size: int = 64,
        mesh: Mesh | None = None,
        batch_axes: str | Sequence[str] | None = None,
    ) -> dict[str, dict[str, float]]:
        """The reranked run {qid: {docid: margin}}, scored through a fresh `InferenceEngine` of `model`.

        With `mesh` (the training mesh holding `model`'s weights) the engine runs over that mesh with the weights
        where they are, batches split over `batch_axes` (see the module docstring); every process must call it.
        Without, the weights are copied onto this process's devices."""
        engine = InferenceEngine(
            model,
            tokenizer,
            batch_size=batch_size,
            max_document_tokens=self.max_document_tokens,
            share_weights=False,
            show_progress=False,
            mesh=mesh,
            batch_axes=batch_axes,
        )
        # meta={}: no fingerprint of the weights (it would read every weight to the host)
        states = engine.encode_ids(self.doc_tokens, ratio, storage="float32", meta={})
        margins = engine.margins(self.prompt_tokens, self.pairs[:, 0], states, self.pairs[:, 1])
        run: dict[str, dict[str, float]] = {q: {} for q in self.query_ids}
        for (q, p), m in zip(self.pairs, margins):
            run[self.query_ids[q]][self.doc_ids[p]] = float(m)
        return run

    def ndcg10(self, run: dict[str, dict[str, float]]) -> float:
        from kalm_jax.evaluation.metrics import evaluate

        return float(evaluate(self.qrels, run)["ndcg_cut_10"])

    def evaluate(
        self,
        model: T5Gemma2,
        tokenizer: AnyTokenizer,
        *,
        ratio: int,
        batch_size: int = 64,
        mesh: Mesh | None = None,
        batch_axes: str | Sequence[str] | None = None,
    ) -> dict[str, float]:
        """{"dev_ndcg@10": reranked, "dev_bm25_ndcg@10": first stage} (`mesh`, `batch_axes`: see `rerank`)."""
        run = self.rerank(model, tokenizer, ratio=ratio, batch_size=batch_size, mesh=mesh, batch_axes=batch_axes)
        return {"dev_ndcg@10": self.ndcg10(run), "dev_bm25_ndcg@10": self.ndcg10(self.first_stage)}


__all__ = ["DevSet"]
