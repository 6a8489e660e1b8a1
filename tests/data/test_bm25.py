"""BM25 first stage against trec_eval (pytrec_eval) figures."""

from __future__ import annotations

import numpy as np
import pytrec_eval

from kalm_jax.data.beir import load_beir
from kalm_jax.data.bm25 import BM25Index, bm25_run
from kalm_jax.data.trec import read_run, write_run


def _ndcg10(qrels, run) -> float:
    per_query = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10"}).evaluate(run)
    assert len(per_query) == len(qrels)
    return float(np.mean([m["ndcg_cut_10"] for m in per_query.values()]))


def test_scifact_bm25_ndcg(data_dir, scifact_index, tmp_path):
    ds = load_beir(data_dir / "scifact", "test")
    run = scifact_index.search(ds.queries, k=100, show_progress=False)
    assert set(run) == set(ds.queries) and all(0 < len(v) <= 100 for v in run.values())
    # Score the run as written to disk, i.e. what a user hands to trec_eval.
    path = tmp_path / "scifact.bm25.trec.gz"
    write_run(run, path, tag="bm25")
    ndcg = _ndcg10(ds.qrels, read_run(path))
    print(f"scifact BM25 nDCG@10 = {ndcg:.4f}")
    assert ndcg >= 0.655  # BEIR paper BM25: 0.665; Pyserini flat: 0.679


def test_shipped_dl19_run(data_dir):
    ds = load_beir(data_dir / "trec-dl-2019-passage", "test", on_missing="keep")
    run = read_run(data_dir / "trec-dl-2019-passage" / "runs" / "bm25.top100.trec.gz")
    assert round(_ndcg10(ds.qrels, run), 4) == 0.5058


def test_index_save_load_and_small_corpus(data_dir, tmp_path):
    ds = load_beir(data_dir / "adi", "test")
    index = BM25Index.build(ds.corpus, show_progress=False)
    index.save(tmp_path / "idx")
    again = BM25Index.load(tmp_path / "idx")
    assert again.doc_ids == index.doc_ids
    assert again.search(ds.queries, 10, show_progress=False) == index.search(ds.queries, 10, show_progress=False)
    # k beyond the corpus size is clamped; a stop-word-only query gets an empty ranking.
    run = bm25_run(
        {"a": "solar power plants", "b": "wind power", "c": "the cat"},
        {"q": "power of the wind", "s": "the of and"},
        k=10,
        show_progress=False,
    )
    assert list(run["q"]) == ["b", "a"] and run["s"] == {}
