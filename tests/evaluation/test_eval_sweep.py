"""The sweep end to end with a tiny random checkpoint on scifact and TREC DL 2019: the output contract, store
reuse, resuming after a crash, refusing mismatched output dirs and stale stores, bad input, and the CLI."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kalm_jax.checkpoints import orbax_io
from kalm_jax.data.trec import read_run
from kalm_jax.evaluation import metrics, rerank, sweep
from kalm_jax.evaluation import results as results_lib
from kalm_jax.evaluation import store as store_lib
from kalm_jax.inference import programs
from kalm_jax.model.build import build_model
from kalm_jax.model.config import get_preset

REPO = Path(__file__).resolve().parents[2]
DATASETS = ("scifact", "trec-dl-2019-passage")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tokenizer):
    d = tmp_path_factory.mktemp("ckpt") / "tiny"
    orbax_io.save_model(build_model(get_preset("tiny"), seed=11), d)
    shutil.copy(tokenizer.path, d / "tokenizer.model")
    return d


def _config(data_dir, out, ckpt=None, **kw):
    cfg = dict(
        data_dir=str(data_dir),
        datasets=",".join(DATASETS),
        output_dir=str(out),
        ratios="1,4,8",
        max_queries=2,
        top_k=10,
        max_document_tokens=64,
        progress=False,
        checkpoint=str(ckpt) if ckpt else "",
    )
    cfg.update(kw)
    return cfg


@pytest.fixture
def counters(monkeypatch):
    calls = {"encode": 0, "rerank": []}
    real_encode, real_rerank = programs.encode_pool, rerank.rerank

    def encode(*a, **k):
        calls["encode"] += 1
        return real_encode(*a, **k)

    def rr(scorer, rows, run, source, ratio, **k):
        calls["rerank"].append(ratio)
        return real_rerank(scorer, rows, run, source, ratio, **k)

    monkeypatch.setattr(programs, "encode_pool", encode)
    monkeypatch.setattr(rerank, "rerank", rr)
    return calls


@pytest.fixture(scope="module")
def finished(tmp_path_factory, data_dir, ckpt):
    out = tmp_path_factory.mktemp("sweep") / "out"
    rows = sweep.run_sweep(_config(data_dir, out, ckpt))
    return out, rows


def test_sweep_end_to_end_output_contract(finished, ckpt, data_dir):
    out, rows = finished
    lines = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert lines == rows and len(rows) == 2 * (1 + 3)
    cells = {(r["dataset"], r["stage"], r["checkpoint"], r["ratio"], r["instruction"]) for r in rows}
    assert cells == {(d, "first_stage", None, None, None) for d in DATASETS} | {
        (d, "rerank", str(ckpt), r, "default") for d in DATASETS for r in (1, 4, 8)
    }
    for r in rows:
        assert {"dataset", "split", "stage", "checkpoint", "ratio", "instruction", "metrics"} <= set(r)
        assert r["split"] == "test"
        assert {"ndcg_cut_10", "recip_rank", "map", "recall_100", "recall_10"} <= set(r["metrics"])
        assert all(isinstance(v, float) for k, v in r["metrics"].items() if k != "roc_auc")
        # the run file written for the cell scores what the row says
        ds = sweep.prepare_dataset(sweep.Settings.from_config(_config(data_dir, out)), r["dataset"])
        again = metrics.evaluate(
            ds.qrels, read_run(out / r["run_file"]), relevance_level=ds.relevance_level, recall_cutoffs=(10, 100)
        )
        assert again["ndcg_cut_10"] == pytest.approx(r["metrics"]["ndcg_cut_10"], abs=1e-9)
        if r["stage"] == "rerank":
            c = r["cost"]
            assert c["cache_bytes"] > 0 and c["online_seconds_per_query"] > 0 and c["cached_passages"] <= 20
            assert c["devices"] == 8
    by_ratio = {r["ratio"]: r["cost"]["cache_bytes"] for r in rows if r["dataset"] == "scifact" and r["ratio"]}
    assert by_ratio[1] > by_ratio[4] > by_ratio[8]
    first = {r["dataset"]: r for r in rows if r["stage"] == "first_stage"}
    assert first["trec-dl-2019-passage"]["relevance_level"] == 2
    assert first["trec-dl-2019-passage"]["warnings"]["qrels doc not in corpus"] == 5426  # counted and warned
    summary = (out / "summary.md").read_text()
    assert "## scifact (test)" in summary and "| rerank | tiny | default | 8 |" in summary
    assert len((out / "results.csv").read_text().splitlines()) == len(rows) + 1
    assert len(list((out / "plots").glob("*.png"))) == 6


def test_kalm_report_regenerates_the_report_from_results_jsonl(finished, tmp_path, capsys):
    """`kalm-report OUT` rewrites summary.md, results.csv and the plots from results.jsonl alone; a directory
    without results.jsonl is one line naming it (exit 2)."""
    from kalm_jax.cli import report as report_cli

    out, rows = finished
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "results.jsonl").write_bytes((out / "results.jsonl").read_bytes())
    assert report_cli.main([str(copy)]) == 0
    assert (copy / "summary.md").read_text() == (out / "summary.md").read_text()
    assert (copy / "results.csv").read_text() == (out / "results.csv").read_text()
    assert len(list((copy / "plots").glob("*.png"))) == 6
    capsys.readouterr()
    assert report_cli.main([str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no results.jsonl" in err[0], err


def test_second_run_encodes_and_scores_nothing_and_grid_growth_reuses_the_store(finished, counters, data_dir, ckpt):
    out, rows = finished
    assert sweep.run_sweep(_config(data_dir, out, ckpt)) == rows
    assert counters == {"encode": 0, "rerank": []}
    grown = sweep.run_sweep(_config(data_dir, out, ckpt, ratios="1,2,4,8"))
    assert counters["encode"] == 0 and counters["rerank"] == [2, 2]  # ratio 2 re-pooled from the stored ratio 1
    assert grown[: len(rows)] == rows and len(grown) == len(rows) + 2


def test_crash_midway_then_rerun_finishes_only_missing_cells(tmp_path, data_dir, ckpt, counters, monkeypatch, finished):
    out = tmp_path / "out"
    real_append, appended = results_lib.append, []

    def crashing(output_dir, row):
        if len(appended) == 4:
            raise KeyboardInterrupt("killed")
        real_append(output_dir, row)
        appended.append(row)

    monkeypatch.setattr(results_lib, "append", crashing)
    with pytest.raises(KeyboardInterrupt):
        sweep.run_sweep(_config(data_dir, out, ckpt, store_dir=str(tmp_path / "store")))
    before = sweep.read_results(out)
    assert len(before) == 4 and counters["rerank"] == [1, 4, 8]  # 2 first stages, scifact r=1,4; r=8 lost
    with open(out / "results.jsonl", "a") as f:
        f.write('{"dataset": "scif')  # a torn line from the kill
    monkeypatch.setattr(results_lib, "append", real_append)
    counters["rerank"].clear()
    counters["encode"] = 0
    after = sweep.run_sweep(_config(data_dir, out, ckpt, store_dir=str(tmp_path / "store")))
    assert counters["rerank"] == [8, 1, 4, 8]
    assert after[:4] == before  # finished results untouched
    assert len({sweep.cell_key(r) for r in after}) == len(after) == 8
    assert counters["encode"] > 0  # only DL19's passages: scifact's store was complete
    ref = {sweep.cell_key(r): r["metrics"] for r in finished[1]}
    assert {sweep.cell_key(r): r["metrics"] for r in after} == ref  # same numbers as the uninterrupted sweep


def test_output_dir_of_another_config_and_stale_store_are_refused(finished, data_dir, ckpt, tmp_path):
    out, _ = finished
    with pytest.raises(sweep.SweepConfigError, match="top_k: results used 10, now 20"):
        sweep.run_sweep(_config(data_dir, out, ckpt, top_k=20))
    # the same checkpoint path now holds different weights: its store is stale
    moved = tmp_path / "tiny"
    shutil.copytree(ckpt, moved)
    cfg = _config(data_dir, tmp_path / "o1", moved, store_dir=str(tmp_path / "st"), ratios="4", datasets="scifact")
    sweep.run_sweep(cfg)
    orbax_io.save_model(build_model(get_preset("tiny"), seed=12), moved, overwrite=True)
    shutil.copy(ckpt / "tokenizer.model", moved / "tokenizer.model")
    with pytest.raises(store_lib.StaleStoreError, match="model: stored"):
        sweep.run_sweep({**cfg, "output_dir": str(tmp_path / "o2")})


def test_bad_input(data_dir, tmp_path, caplog):
    bad = tmp_path / "data"
    shutil.copytree(data_dir / "trec-dl-2019-passage", bad / "dl")
    (bad / "broken").mkdir()
    (bad / "broken" / "queries.jsonl").write_text("")
    cfg = _config(bad, tmp_path / "o", datasets="dl,broken,absent")
    with pytest.raises(FileNotFoundError) as e:
        sweep.run_sweep(cfg)
    msg = str(e.value)
    assert f"dataset 'broken': {bad / 'broken'} has neither corpus.jsonl nor corpus.jsonl.gz" in msg
    assert "qrels/test.tsv does not exist" in msg and "'absent'" in msg
    with gzip.open(bad / "dl" / "runs" / "bm25.top100.trec.gz", "at") as f:
        f.write("19335 Q0 not-a-doc 101 0.5 bm25\n")
    cfg = _config(bad, tmp_path / "o2", datasets="dl", first_stage="run:runs/bm25.top100.trec.gz", max_queries=0)
    with pytest.raises(ValueError, match=r"1 docs of the run are not in dl's corpus, e\.g\. \['not-a-doc'\]"):
        sweep.run_sweep(cfg)
    rows = sweep.run_sweep({**cfg, "on_unknown_docs": "drop", "output_dir": str(tmp_path / "o3")})
    assert rows[0]["warnings"]["run docs not in corpus"] == 1
    assert "not in dl's corpus" in caplog.text and "5426 judgments of docs not in the corpus" in caplog.text
    with pytest.raises(sweep.SweepConfigError, match="first_stage must be"):
        sweep.run_sweep({**cfg, "first_stage": "bm42"})


def test_cli_first_stage_only_reports_the_dl19_bm25_figure(data_dir, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "eval.py"),
            f"--config.data_dir={data_dir}",
            "--config.datasets=trec-dl-2019-passage",
            "--config.first_stage=run:runs/bm25.top100.trec.gz",
            f"--config.output_dir={out}",
            "--config.progress=False",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    (row,) = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert row["stage"] == "first_stage" and row["checkpoint"] is None
    assert round(row["metrics"]["ndcg_cut_10"], 4) == 0.5058
