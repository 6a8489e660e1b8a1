"""rerank: ids stay aligned through batching, lookup and cascades (an oracle scorer reaches the ideal nDCG).

Scores through the store vs from text: tests/evaluation/test_eval_store.py."""

from __future__ import annotations

import numpy as np
import pytest

from kalm_jax.data.beir import load_beir
from kalm_jax.data.trec import read_run
from kalm_jax.evaluation import metrics, rerank
from kalm_jax.inference.states import PassageStates


class OracleMargins:
    """Test double for the jitted scorer: recovers (query, doc) from the batch it is given and returns the
    qrels grade. Query identity comes from the decoder prompt tokens; doc identity from passage states whose
    every window holds the doc's row index (re-pooling a constant keeps it)."""

    def __init__(self, qrels, prompt_rows, doc_ids):
        self.by_prompt = {tuple(row.tolist()): q for q, row in prompt_rows.items()}
        self.qrels, self.doc_ids, self.calls = qrels, doc_ids, 0

    compiles = 0

    def margins(self, prompt_rows, prompt_of, states, passage_of, **kwargs):
        self.calls += 1
        assert len(prompt_of) == len(passage_of)
        dense, mask = states.dense(), np.asarray(states.mask).astype(bool)
        out = []
        for p, s in zip(prompt_of, passage_of):
            q = self.by_prompt[tuple(np.asarray(prompt_rows[p]).tolist())]
            idx = dense[s][mask[s], 0]
            assert np.all(idx == idx[0])
            out.append(self.qrels[q].get(self.doc_ids[int(idx[0])], 0))
        return np.asarray(out, np.float32)


@pytest.fixture(scope="module")
def dl19(data_dir):
    ds = load_beir(data_dir / "trec-dl-2019-passage", "test", on_missing="keep")
    return ds, read_run(data_dir / "trec-dl-2019-passage" / "runs" / "bm25.top100.trec.gz")


@pytest.mark.parametrize("cascade", [None, (8, 20)])
def test_oracle_reaches_ideal_ndcg_of_the_pool(dl19, tokenizer, cascade):
    ds, run = dl19
    docs = sorted({d for r in run.values() for d in r})
    rng = np.random.default_rng(0)
    docs = [docs[i] for i in rng.permutation(len(docs))]  # storage order unrelated to the run's order
    lengths = rng.integers(1, 6, len(docs))
    mask = (np.arange(5)[None] < lengths[:, None]).astype(np.int8)
    states = np.broadcast_to(np.arange(len(docs), dtype=np.float32)[:, None, None], (len(docs), 5, 3)) * mask[..., None]
    source = PassageStates(np.ascontiguousarray(states), mask, mask.astype(np.int32) * 2, 2, docs)
    rows = rerank.tokenize_prompts(tokenizer, ds.queries)
    oracle = OracleMargins(ds.qrels, rows, docs)
    out = rerank.rerank(oracle, rows, run, source, 4, top_k=100, cascade=cascade, batch_pairs=96, progress=False)
    assert oracle.calls > 40  # several queries per batch and queries split across batches
    assert out.pairs == sum(len(r) for r in run.values()) + (20 * len(run) if cascade else 0)
    got = metrics.evaluate(ds.qrels, out.run, relevance_level=2)
    ideal = metrics.evaluate(ds.qrels, metrics.ideal_run(ds.qrels, run), relevance_level=2)
    first = metrics.evaluate(ds.qrels, run, relevance_level=2)
    assert got["ndcg_cut_10"] == pytest.approx(ideal["ndcg_cut_10"], abs=1e-12)
    assert got["map"] == pytest.approx(ideal["map"], abs=1e-12)
    assert got["ndcg_cut_10"] > first["ndcg_cut_10"] + 0.3
    assert {q: set(r) for q, r in out.run.items()} == {q: set(r) for q, r in run.items()}


def test_top_k_and_unknown_docs(dl19, tokenizer):
    ds, run = dl19
    docs = sorted({d for r in run.values() for d in r})
    source = PassageStates(
        np.arange(len(docs), dtype=np.float32)[:, None, None] * np.ones((1, 1, 2), np.float32),
        np.ones((len(docs), 1), np.int8),
        np.ones((len(docs), 1), np.int32),
        1,
        docs,
    )
    rows = rerank.tokenize_prompts(tokenizer, dict(list(ds.queries.items())[:3]))
    out = rerank.rerank(OracleMargins(ds.qrels, rows, docs), rows, run, source, 1, top_k=7, progress=False)
    for q in rows:
        first7 = [d for d, _ in sorted(run[q].items(), key=lambda kv: (-kv[1], kv[0]))[:7]]
        assert set(out.run[q]) == set(first7)
    bad = {q: {**run[q], "no-such-doc": 99.0} for q in rows}
    with pytest.raises(KeyError, match="no-such-doc"):
        rerank.rerank(OracleMargins(ds.qrels, rows, docs), rows, bad, source, 1, progress=False)
