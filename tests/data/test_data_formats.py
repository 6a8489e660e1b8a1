"""BEIR, TREC run and training JSONL formats on real data, and their bad-input errors."""

from __future__ import annotations

import gzip
import json
import shutil

import pytest

from kalm_jax.data.beir import available_splits, load_beir, load_qrels, passage_text, write_beir
from kalm_jax.data.textfile import DataError, SkipCounter
from kalm_jax.data.training_jsonl import TrainingExample, read_training_jsonl, write_training_jsonl
from kalm_jax.data.trec import read_run, write_run


def _mini_beir(tmp_path, corpus_lines, query_lines, qrels_rows, split="test", gz=True):
    d = tmp_path / "mini"
    (d / "qrels").mkdir(parents=True)
    opener = gzip.open if gz else open
    with opener(d / ("corpus.jsonl.gz" if gz else "corpus.jsonl"), "wt") as f:
        f.write("\n".join(corpus_lines) + "\n")
    (d / "queries.jsonl").write_text("\n".join(query_lines) + "\n")
    (d / "qrels" / f"{split}.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(f"{r}\n" for r in qrels_rows))
    return d


GOOD_CORPUS = ['{"_id": "d1", "title": "T1", "text": "alpha"}', '{"_id": "d2", "title": "", "text": "beta"}']
GOOD_QUERIES = ['{"_id": "q1", "text": "what is alpha"}', '{"_id": "q2", "text": "unjudged"}']


def test_scifact_loads(data_dir):
    ds = load_beir(data_dir / "scifact", "test")
    assert len(ds.corpus) == 5183 and len(ds.queries) == 300
    assert sum(len(v) for v in ds.qrels.values()) == 339
    assert set(ds.queries) == set(ds.qrels)
    train = load_beir(data_dir / "scifact", "train")
    assert len(train.queries) == 809 and sum(len(v) for v in train.qrels.values()) == 919
    assert available_splits(data_dir / "scifact") == ["test", "train"]
    doc_id = next(iter(ds.corpus))
    doc = ds.corpus[doc_id]
    assert ds.passage(doc_id) == f"{doc['title']} {doc['text']}"


def test_passage_text_join():
    assert passage_text({"title": "T", "text": "body"}) == "T body"
    assert passage_text({"title": "", "text": "body"}) == "body"
    assert passage_text({"title": "T ", "text": ""}) == "T"


def test_unknown_split(data_dir):
    with pytest.raises(ValueError, match=r"unknown split 'dev'; available: \['test', 'train'\]"):
        load_beir(data_dir / "scifact", "dev")


def test_dl19_missing_docs(data_dir):
    with pytest.raises(DataError, match=r"qrels/test\.tsv:\d+: doc id .* is not in the corpus"):
        load_beir(data_dir / "trec-dl-2019-passage", "test")
    kept = load_beir(data_dir / "trec-dl-2019-passage", "test", on_missing="keep")
    assert sum(len(v) for v in kept.qrels.values()) == 9260
    # SOURCES.md: 41.4% of DL19 qrels rows have their passage in the shipped corpus.
    assert abs(kept.skipped.counts["qrels doc not in corpus"] / 9260 - (1 - 0.414)) < 0.0006
    dropped = load_beir(data_dir / "trec-dl-2019-passage", "test", on_missing="drop")
    assert all(d in dropped.corpus for docs in dropped.qrels.values() for d in docs)


def test_malformed_json_line(tmp_path):
    d = _mini_beir(tmp_path, GOOD_CORPUS + ['{"_id": "d3", "text": '], GOOD_QUERIES, ["q1\td1\t1"])
    with pytest.raises(DataError, match=r"corpus\.jsonl\.gz:3: malformed JSON"):
        load_beir(d, "test")
    ds = load_beir(d, "test", on_error="skip")
    assert set(ds.corpus) == {"d1", "d2"} and ds.skipped.counts == {"malformed JSON": 1}
    assert ds.queries == {"q1": "what is alpha"}


def test_empty_texts(tmp_path):
    d = _mini_beir(tmp_path, GOOD_CORPUS + ['{"_id": "d3", "title": "", "text": "  "}'], GOOD_QUERIES, ["q1\td1\t1"])
    with pytest.raises(DataError, match=r"corpus\.jsonl\.gz:3: doc 'd3' has empty title and text"):
        load_beir(d, "test")
    d2 = _mini_beir(tmp_path / "b", GOOD_CORPUS, GOOD_QUERIES + ['{"_id": "q3", "text": ""}'], ["q1\td1\t1"])
    with pytest.raises(DataError, match=r"queries\.jsonl:3: query 'q3' has empty or missing text"):
        load_beir(d2, "test")


def test_missing_ids_referenced_by_qrels(tmp_path):
    d = _mini_beir(tmp_path, GOOD_CORPUS, GOOD_QUERIES, ["q1\td1\t1", "q1\td9\t1"])
    with pytest.raises(DataError, match=r"test\.tsv:3: doc id 'd9' \(query 'q1'\) is not in the corpus"):
        load_beir(d, "test")
    d2 = _mini_beir(tmp_path / "b", GOOD_CORPUS, GOOD_QUERIES, ["q1\td1\t1", "q7\td2\t1"])
    with pytest.raises(DataError, match=r"test\.tsv:3: query id 'q7' is not in queries"):
        load_beir(d2, "test")
    ds = load_beir(d2, "test", on_missing="drop")
    assert ds.qrels == {"q1": {"d1": 1}} and ds.skipped.counts["qrels query not in queries"] == 1


def test_truncated_gzip(tmp_path, data_dir):
    d = tmp_path / "trunc"
    shutil.copytree(data_dir / "adi", d)
    raw = (d / "corpus.jsonl.gz").read_bytes()
    (d / "corpus.jsonl.gz").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match=r"corpus\.jsonl\.gz:\d+: compressed stream is truncated"):
        load_beir(d, "test")
    run = tmp_path / "r.trec.gz"
    raw = (data_dir / "trec-dl-2019-passage" / "runs" / "bm25.top100.trec.gz").read_bytes()
    run.write_bytes(raw[:-100])
    with pytest.raises(DataError, match=r"r\.trec\.gz:\d+: compressed stream is truncated"):
        read_run(run)


def test_beir_write_roundtrip(data_dir, tmp_path):
    ds = load_beir(data_dir / "adi", "test")
    write_beir(ds, tmp_path / "adi")
    again = load_beir(tmp_path / "adi", "test")
    assert again.corpus == ds.corpus and again.queries == ds.queries and again.qrels == ds.qrels


def test_trec_qrels_format(tmp_path):
    p = tmp_path / "q.txt"
    p.write_text("1 0 d1 2\n1 0 d2 0\n2 0 d3 1\n")
    assert load_qrels(p) == {"1": {"d1": 2, "d2": 0}, "2": {"d3": 1}}


def test_run_read_write(data_dir, tmp_path):
    run = read_run(data_dir / "trec-dl-2019-passage" / "runs" / "bm25.top100.trec.gz")
    assert len(run) == 43 and all(len(v) == 100 for v in run.values())
    for suffix in (".trec", ".trec.gz"):
        out = tmp_path / f"copy{suffix}"
        write_run(run, out, tag="copy")
        again = read_run(out)
        assert again.keys() == run.keys()
        for q in run:
            assert again[q].keys() == run[q].keys()
            assert again[q] == run[q]  # scores round-trip exactly
    top = tmp_path / "top3.trec"
    write_run({"q": {"a": 1.0, "b": 3.0, "c": 2.0, "d": 0.5}}, top, tag="t", k=3)
    assert top.read_text().splitlines() == ["q Q0 b 1 3.0 t", "q Q0 c 2 2.0 t", "q Q0 a 3 1.0 t"]


def test_run_bad_rows(tmp_path):
    p = tmp_path / "bad.trec"
    p.write_text("q Q0 a 1 1.0 t\nq Q0 b 2 x t\nq Q0 c 3\n")
    with pytest.raises(DataError, match=r"bad\.trec:2: rank '2' / score 'x' is not a number"):
        read_run(p)
    skipped = SkipCounter()
    assert read_run(p, on_error="skip", skipped=skipped) == {"q": {"a": 1.0}}
    assert skipped.total == 2


def test_training_jsonl_roundtrip_and_validation(tmp_path):
    examples = [
        TrainingExample(
            query="q1",
            pos=["p"],
            neg=["n1", "n2"],
            pos_scores=[0.9],
            neg_scores=[0.1, 0.2],
            prompt="Given a claim, find evidence.",
            qid="1",
            pos_ids=["d1"],
            neg_ids=["d2", "d3"],
        ),
        TrainingExample(query="q2", pos=["p2", "p3"], neg=["n"]),
    ]
    for name in ("train.jsonl", "train.jsonl.gz"):
        path = tmp_path / name
        assert write_training_jsonl(examples, path) == 2
        assert read_training_jsonl(path) == examples
    bad = tmp_path / "bad.jsonl"
    lines = [
        json.dumps({"query": "ok", "pos": ["p"], "neg": ["n"]}),
        json.dumps({"query": "x", "pos": ["p"], "neg": ["n"], "neg_scores": [0.1, 0.2]}),
        '{"query": "broken", "pos": [',
        json.dumps({"query": "", "pos": ["p"], "neg": ["n"]}),
        json.dumps({"query": "y", "pos": [""], "neg": ["n"]}),
        json.dumps({"query": "z", "pos": ["p"], "neg": []}),
    ]
    bad.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:2: 'neg_scores' has 2 scores for 1 passages"):
        read_training_jsonl(bad)
    skipped = SkipCounter()
    good = read_training_jsonl(bad, on_error="skip", skipped=skipped)
    assert [e.query for e in good] == ["ok"]
    assert skipped.counts == {"invalid training example": 4, "malformed JSON": 1}
    for lineno, msg in (
        (4, "'query' must be a non-empty string"),
        (5, r"'pos'\[0\] is an empty text"),
        (6, "'neg' is empty"),
    ):
        one = tmp_path / f"one{lineno}.jsonl"
        one.write_text("\n".join(lines[:1] + [lines[lineno - 1]]) + "\n")
        with pytest.raises(DataError, match=rf"one{lineno}\.jsonl:2: {msg}"):
            read_training_jsonl(one)


def test_files_with_a_utf8_bom_read_like_without(tmp_path):
    """Editors on Windows save TSV/JSONL/TREC files with a UTF-8 byte-order mark: it is not part of the data."""
    bom = "\ufeff"
    d = _mini_beir(tmp_path, GOOD_CORPUS, GOOD_QUERIES, ["q1\td1\t1"], gz=False)
    for name in ("corpus.jsonl", "queries.jsonl", "qrels/test.tsv"):
        (d / name).write_text(bom + (d / name).read_text(), encoding="utf-8")
    ds = load_beir(d, "test")
    assert ds.qrels == {"q1": {"d1": 1}} and list(ds.corpus) == ["d1", "d2"] and list(ds.queries)[0] == "q1"
    (tmp_path / "q.txt").write_text(bom + "1 0 d1 2\n", encoding="utf-8")
    assert load_qrels(tmp_path / "q.txt") == {"1": {"d1": 2}}
    with gzip.open(tmp_path / "r.trec.gz", "wt", encoding="utf-8") as f:
        f.write(bom + "q1 Q0 d1 1 2.5 t\n")
    assert read_run(tmp_path / "r.trec.gz") == {"q1": {"d1": 2.5}}
