"""Hard negatives mined from BM25 for scifact train."""

from __future__ import annotations

import pytest

from kalm_jax.cli.negatives import main
from kalm_jax.data.beir import load_beir
from kalm_jax.data.negatives import mine_hard_negatives
from kalm_jax.data.training_jsonl import read_training_jsonl
from kalm_jax.data.trec import ranked


@pytest.fixture(scope="module")
def train(data_dir):
    return load_beir(data_dir / "scifact", "train")


@pytest.fixture(scope="module")
def train_run(train, scifact_index):
    return scifact_index.search(train.queries, k=100, show_progress=False)


def test_no_judged_positive_among_negatives(train, train_run):
    examples = mine_hard_negatives(train, train_run, num_negatives=15, seed=3, show_progress=False)
    assert len(examples) == 809
    for ex in examples:
        judged_pos = {d for d, s in train.qrels[ex.qid].items() if s > 0}
        assert set(ex.pos_ids) == judged_pos
        assert not set(ex.neg_ids) & judged_pos
        assert not set(ex.neg) & {train.passage(d) for d in judged_pos}
        assert len(ex.neg) == len(set(ex.neg_ids)) == 15
        assert ex.query == train.queries[ex.qid]
        assert ex.neg == [train.passage(d) for d in ex.neg_ids]
        top = [d for d, _ in ranked(train_run[ex.qid])]
        assert all(d in top for d in ex.neg_ids)


def test_sampling_range_and_determinism(train, train_run):
    a = mine_hard_negatives(
        train, train_run, num_negatives=5, sample_start=10, sample_end=30, seed=1, show_progress=False
    )
    b = mine_hard_negatives(
        train, train_run, num_negatives=5, sample_start=10, sample_end=30, seed=1, show_progress=False
    )
    c = mine_hard_negatives(
        train, train_run, num_negatives=5, sample_start=10, sample_end=30, seed=2, show_progress=False
    )
    assert a == b and a != c
    for ex in a:
        window = [d for d, _ in ranked(train_run[ex.qid])][10:30]
        assert set(ex.neg_ids) <= set(window) and len(ex.neg_ids) == 5
    with pytest.raises(ValueError):
        mine_hard_negatives(train, train_run, sample_start=5, sample_end=5)


def test_cli_writes_valid_jsonl(data_dir, tmp_path, capsys):
    out = tmp_path / "adi.jsonl.gz"
    assert (
        main(
            [
                f"--config.data_dir={data_dir}",
                "--config.dataset=adi",
                "--config.split=test",
                f"--config.out={out}",
                "--config.num_negatives=7",
                "--config.prompt=Given a query, retrieve documents that answer the query.",
            ]
        )
        == 0
    )
    examples = read_training_jsonl(out)
    ds = load_beir(data_dir / "adi", "test")
    assert len(examples) == len(ds.qrels)
    assert all(1 <= len(e.neg) <= 7 and e.prompt for e in examples)
    assert "examples ->" in capsys.readouterr().out
