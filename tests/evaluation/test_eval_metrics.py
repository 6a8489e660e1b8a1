"""metrics: trec_eval numbers against ir-measures, the published DL19 BM25 figure, and hand-computed values."""

from __future__ import annotations

import math

import ir_measures
import numpy as np
import pytest

from kalm_jax.data.beir import load_qrels
from kalm_jax.data.trec import read_run, write_run
from kalm_jax.evaluation import metrics


@pytest.fixture(scope="module")
def dl19(data_dir):
    d = data_dir / "trec-dl-2019-passage"
    return load_qrels(d / "qrels" / "test.tsv"), read_run(d / "runs" / "bm25.top100.trec.gz")


def test_dl19_bm25_first_stage_is_the_published_figure(dl19):
    qrels, run = dl19
    m = metrics.evaluate(qrels, run, relevance_level=metrics.relevance_level_for("trec-dl-2019-passage"))
    assert m["ndcg_cut_10"] == pytest.approx(0.5058, abs=5e-5)
    assert m["num_queries"] == 43 and m["num_ranked"] == 43


@pytest.mark.parametrize("level", [1, 2])
def test_measures_equal_ir_measures(dl19, level):
    qrels, run = dl19
    ours = metrics.evaluate(qrels, run, relevance_level=level, recall_cutoffs=(10, 100))
    ms = [
        ir_measures.nDCG @ 10,
        ir_measures.AP(rel=level),
        ir_measures.RR(rel=level) @ 10,
        ir_measures.R(rel=level) @ 10,
        ir_measures.R(rel=level) @ 100,
    ]
    ref = dict(
        zip(
            ["ndcg_cut_10", "map", "recip_rank", "recall_10", "recall_100"],
            (ir_measures.calc_aggregate(ms, qrels, run)[m] for m in ms),
        )
    )
    for name, value in ref.items():
        assert ours[name] == pytest.approx(value, abs=1e-9), name


def test_missing_queries_count_as_zero_like_trec_eval_c(dl19):
    qrels, run = dl19
    partial = dict(list(run.items())[:30])
    ours = metrics.evaluate(qrels, partial, relevance_level=2)
    per_q = {
        (r.query_id, str(r.measure)): r.value for r in ir_measures.iter_calc([ir_measures.nDCG @ 10], qrels, partial)
    }
    assert ours["ndcg_cut_10"] == pytest.approx(sum(per_q.values()) / 43, abs=1e-9)
    assert ours["num_ranked"] == 30


def test_run_file_round_trip_scores_the_same(dl19, tmp_path):
    qrels, run = dl19
    write_run(run, tmp_path / "r.trec.gz")  # scores written exactly (repr of the float)
    assert read_run(tmp_path / "r.trec.gz") == run
    assert metrics.evaluate(qrels, read_run(tmp_path / "r.trec.gz"), relevance_level=2) == metrics.evaluate(
        qrels, run, relevance_level=2
    )


def test_hand_computed_graded_ndcg_and_mrr_cut():
    qrels = {"q": {"a": 3, "b": 1, "c": 2, "z": 2}}
    # ranking: x(0) a(3) b(1) ... then c(2) at rank 12: beyond the MRR@10 cut
    run = {"q": {"x": 20.0, "a": 19.0, "b": 18.0, **{f"n{i}": 17.0 - i for i in range(8)}, "c": 1.0}}
    dcg = 3 / math.log2(3) + 1 / math.log2(4)
    idcg = 3 / math.log2(2) + 2 / math.log2(3) + 2 / math.log2(4) + 1 / math.log2(5)
    m = metrics.evaluate(qrels, run, relevance_level=2, recall_cutoffs=(10, 100))
    assert m["ndcg_cut_10"] == pytest.approx(dcg / idcg, abs=1e-12)
    assert m["recip_rank"] == pytest.approx(1 / 2)  # a (grade 3) at rank 2; b (grade 1) is not relevant at level 2
    assert m["recall_10"] == pytest.approx(1 / 3) and m["recall_100"] == pytest.approx(2 / 3)
    only_c = {"q": {**{f"n{i}": 10.0 - i for i in range(10)}, "c": 0.5}}
    assert metrics.evaluate(qrels, only_c, relevance_level=2)["recip_rank"] == 0.0  # rank 11: cut at 10


def test_roc_auc_equals_pairwise_count(dl19):
    qrels, run = dl19
    auc = metrics.roc_auc(qrels, run, relevance_level=2)
    wins = total = 0.0
    pos = [s for q, docs in run.items() for d, s in docs.items() if qrels[q].get(d, 0) >= 2]
    neg = np.array([s for q, docs in run.items() for d, s in docs.items() if qrels[q].get(d, 0) < 2])
    for s in pos:
        wins += (s > neg).sum() + 0.5 * (s == neg).sum()
        total += len(neg)
    assert auc == pytest.approx(wins / total, abs=1e-12)
    assert math.isnan(metrics.roc_auc({"q": {"a": 1}}, {"q": {"a": 1.0}}))


def test_ideal_run_is_the_pool_ceiling(dl19):
    qrels, run = dl19
    ideal = metrics.evaluate(qrels, metrics.ideal_run(qrels, run), relevance_level=2)
    first = metrics.evaluate(qrels, run, relevance_level=2)
    assert ideal["ndcg_cut_10"] > first["ndcg_cut_10"] + 0.3
    assert ideal["recall_100"] == first["recall_100"]  # same pool, only reordered


def test_relevance_levels_and_bad_input():
    assert metrics.relevance_level_for("trec-dl-2019-passage") == 2
    assert metrics.relevance_level_for("scifact") == 1
    assert metrics.relevance_level_for("cranfield", {"cran*": 3}) == 3
    with pytest.raises(ValueError, match="qrels are empty"):
        metrics.evaluate({}, {"q": {"a": 1.0}})
