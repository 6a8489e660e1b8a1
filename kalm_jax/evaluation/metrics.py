"""Retrieval metrics through trec_eval (pytrec_eval): nDCG@10, MRR@10, MAP, recall@k, plus ROC-AUC.

Conventions (the trec_eval / Pyserini ones):
  * Averages run over every judged query of the qrels, like ``trec_eval -c``: a judged query missing
    from the run (or with an empty ranking) counts as 0, so a first stage cannot look better by
    dropping hard queries.
  * Graded qrels: nDCG uses the graded gains; binary measures (MAP, MRR, recall) count a document as
    relevant when its grade is >= `relevance_level` (TREC DL: 2; see `relevance_level_for`).
  * ``recip_rank`` is MRR@10: trec_eval's recip_rank over the run cut to its top 10 per query (the MS MARCO
    convention). ``map`` and ``recall_k`` use the whole run (the candidate pool).
  * Ties: trec_eval ignores the rank column and orders equal scores by descending doc id; `cut` does the
    same, so a run file and its in-memory run score the same.
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

log = logging.getLogger(__name__)

Run = Mapping[str, Mapping[str, float]]
Qrels = Mapping[str, Mapping[str, int]]

HEADLINE = "ndcg_cut_10"
MRR_DEPTH = 10
DEFAULT_RECALL_CUTOFFS = (10, 100)

#: Datasets whose qrels are graded 0-3 with "relevant" meaning >= 2 for binary measures (glob patterns).
DEFAULT_RELEVANCE_LEVELS: dict[str, int] = {"trec-dl-*": 2, "msmarco-passage-dl*": 2, "dl19*": 2, "dl20*": 2}


def relevance_level_for(dataset: str, overrides: Mapping[str, int] | None = None) -> int:
    """The minimum grade counted as relevant by binary measures for `dataset` (first matching glob wins)."""
    for table in (overrides or {}, DEFAULT_RELEVANCE_LEVELS):
        for pattern, level in table.items():
            if fnmatch.fnmatch(dataset, pattern):
                return int(level)
    return 1


def cut(run: Run, k: int) -> dict[str, dict[str, float]]:
    """The top `k` documents of each query (trec_eval order: score desc, then doc id desc)."""
    out = {}
    for qid, docs in run.items():
        ranked = sorted(docs.items(), key=lambda kv: (kv[1], kv[0]), reverse=True)[:k]
        out[qid] = dict(ranked)
    return out


def _mean_over_judged(per_query: Mapping[str, Mapping[str, float]], qrels: Qrels, measure: str) -> float:
    return float(np.mean([per_query.get(q, {}).get(measure, 0.0) for q in qrels])) if qrels else float("nan")


def _clean(run: Run) -> dict[str, dict[str, float]]:
    # pytrec_eval needs plain str -> float dicts; empty rankings are dropped (they count as 0 anyway).
    return {str(q): {str(d): float(s) for d, s in docs.items()} for q, docs in run.items() if docs}


def evaluate(
    qrels: Qrels,
    run: Run,
    *,
    relevance_level: int = 1,
    recall_cutoffs: Sequence[int] = DEFAULT_RECALL_CUTOFFS,
    ndcg_cutoffs: Sequence[int] = (10,),
    per_query: bool = False,
) -> dict[str, float] | tuple[dict[str, float], dict[str, dict[str, float]]]:
    """trec_eval measures of `run` against `qrels`, averaged over all judged queries (``-c``).

    Args:
      qrels: {qid: {docid: grade}} (grades may be 0).
      run: {qid: {docid: score}}; higher scores rank first.
      relevance_level: minimum grade counted as relevant by the binary measures.
      recall_cutoffs: k of the ``recall_k`` measures (recall of the candidate pool at depth k).
      ndcg_cutoffs: k of the ``ndcg_cut_k`` measures.
      per_query: also return {qid: {measure: value}} for every judged query.
    Returns:
      {measure: mean} with keys ``ndcg_cut_k``, ``recip_rank`` (MRR@10), ``map``, ``recall_k``, and
      ``num_queries`` (judged queries averaged over) / ``num_ranked`` (of them, with a non-empty ranking).
    """
    qrels = {str(q): {str(d): int(g) for d, g in docs.items()} for q, docs in qrels.items()}
    if not qrels:
        raise ValueError("qrels are empty: nothing to evaluate")
    run = _clean(run)
    judged_run = {q: docs for q, docs in run.items() if q in qrels}
    ndcg = "ndcg_cut." + ",".join(str(int(k)) for k in ndcg_cutoffs)
    recall = "recall." + ",".join(str(int(k)) for k in recall_cutoffs)
    import pytrec_eval

    full = pytrec_eval.RelevanceEvaluator(qrels, {ndcg, "map", recall}, relevance_level=int(relevance_level))
    rr = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}, relevance_level=int(relevance_level))
    pq = full.evaluate(judged_run)
    for q, vals in rr.evaluate(cut(judged_run, MRR_DEPTH)).items():
        pq.setdefault(q, {})["recip_rank"] = vals["recip_rank"]
    names = (
        [f"ndcg_cut_{int(k)}" for k in ndcg_cutoffs]
        + ["recip_rank", "map"]
        + [f"recall_{int(k)}" for k in recall_cutoffs]
    )
    means = {m: _mean_over_judged(pq, qrels, m) for m in names}
    means["num_queries"] = float(len(qrels))
    means["num_ranked"] = float(len(judged_run))
    if per_query:
        return means, {q: {m: pq.get(q, {}).get(m, 0.0) for m in names} for q in qrels}
    return means


def ideal_run(qrels: Qrels, run: Run) -> dict[str, dict[str, float]]:
    """The best possible reordering of each query's candidates: scores = qrels grades (0 if unjudged).

    Its metrics are the ceiling any reranker of this candidate pool can reach.
    """
    return {
        q: {d: float(qrels.get(q, {}).get(d, 0)) - 1e-6 * i for i, d in enumerate(sorted(docs))}
        for q, docs in run.items()
    }


def roc_auc(qrels: Qrels, run: Run, *, relevance_level: int = 1) -> float:
    """ROC-AUC of the run's scores vs binary relevance, pooled over all (query, candidate) pairs.

    Unjudged candidates count as non-relevant (the trec_eval convention). Scores are compared across
    queries, so this measures calibration of the margin as a relevance classifier (the paper's
    compression analysis). NaN when the pairs hold only one class.
    """
    from sklearn.metrics import roc_auc_score

    labels, scores = [], []
    for q, docs in run.items():
        judged = qrels.get(q)
        if judged is None:
            continue
        for d, s in docs.items():
            labels.append(int(judged.get(d, 0) >= relevance_level))
            scores.append(float(s))
    if len(set(labels)) < 2:
        return float("nan")
    return float(roc_auc_score(np.asarray(labels), np.asarray(scores, np.float64)))


def candidate_coverage(
    qrels: Qrels, run: Run, corpus_ids: Iterable[str] | None = None, *, relevance_level: int = 1
) -> dict[str, float]:
    """How much of the judged-relevant material the candidate pool and corpus hold.

    Returns ``relevant`` (judged-relevant pairs), ``relevant_in_pool`` (of them, retrieved), and
    ``relevant_in_corpus`` (of them, whose doc exists in `corpus_ids`, when given).
    """
    corpus = set(corpus_ids) if corpus_ids is not None else None
    rel = [(q, d) for q, docs in qrels.items() for d, g in docs.items() if g >= relevance_level]
    out = {"relevant": float(len(rel)), "relevant_in_pool": float(sum(d in run.get(q, {}) for q, d in rel))}
    if corpus is not None:
        out["relevant_in_corpus"] = float(sum(d in corpus for _, d in rel))
    return out


__all__ = [
    "evaluate",
    "roc_auc",
    "ideal_run",
    "cut",
    "candidate_coverage",
    "relevance_level_for",
    "HEADLINE",
    "MRR_DEPTH",
    "DEFAULT_RELEVANCE_LEVELS",
]
