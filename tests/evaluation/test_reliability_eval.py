"""Evaluation reliability: one definition of a complete results row, the output-directory lock, settings
ranges."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

from kalm_jax.evaluation import results
from kalm_jax.evaluation.results import OutputDirLocked, append, output_lock, read_results
from kalm_jax.evaluation.settings import Settings, SweepConfigError
from kalm_jax.evaluation.sweep import run_sweep


def row(i: int) -> dict:
    return {"dataset": "d", "split": "test", "stage": "rerank", "checkpoint": "c", "ratio": i, "instruction": "x"}


def test_complete_last_row_without_newline_is_kept(tmp_path):
    (tmp_path / results.RESULTS).write_text(json.dumps(row(1)) + "\n" + json.dumps(row(2)))  # no final newline
    assert [r["ratio"] for r in read_results(tmp_path)] == [1, 2]
    append(tmp_path, row(3))
    assert [r["ratio"] for r in read_results(tmp_path)] == [1, 2, 3]
    assert (tmp_path / results.RESULTS).read_text().count("\n") == 3


def test_torn_last_line_is_skipped_by_both(tmp_path):
    (tmp_path / results.RESULTS).write_text(json.dumps(row(1)) + "\n" + json.dumps(row(2))[:20])
    assert [r["ratio"] for r in read_results(tmp_path)] == [1]
    append(tmp_path, row(3))
    assert [r["ratio"] for r in read_results(tmp_path)] == [1, 3]
    (tmp_path / results.RESULTS).write_text("[1, 2]\n" + json.dumps(row(1)) + "\n")
    with pytest.raises(ValueError, match=r"results.jsonl:1"):
        read_results(tmp_path)


def test_lock_is_exclusive_and_released_by_a_killed_holder(tmp_path):
    with output_lock(tmp_path), pytest.raises(OutputDirLocked, match="pid "), output_lock(tmp_path):
        pass
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            (
                "import fcntl, sys, time; f = open(sys.argv[1], 'a+'); fcntl.flock(f, fcntl.LOCK_EX); "
                "print('locked', flush=True); time.sleep(60)"
            ),
            str(tmp_path / results.LOCK_FILE),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(OutputDirLocked), output_lock(tmp_path):
        pass
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with output_lock(tmp_path):  # a killed run leaves no stale lock
        pass


def test_run_sweep_refuses_a_directory_in_use(tmp_path, data_dir):
    cfg = {
        "data_dir": str(data_dir),
        "datasets": "scifact",
        "output_dir": str(tmp_path / "out"),
        "ratios": "4",
        "progress": False,
        "report": False,
    }
    with output_lock(tmp_path / "out"):
        t0 = time.perf_counter()
        with pytest.raises(OutputDirLocked, match="in use by another run"):
            run_sweep(cfg)
        assert time.perf_counter() - t0 < 5
    assert not (tmp_path / "out" / results.RESULTS).exists()


@pytest.mark.parametrize(
    "field,value",
    [
        ("max_queries", -3),
        ("relevance_level", -1),
        ("max_document_tokens", -1),
        ("batch_pairs", 0),
        ("encode_batch_size", 0),
        ("top_k", 2.5),
        ("shard_size", True),
        ("store_lock_timeout", -1.0),
        ("store_lock_timeout", float("nan")),
        ("quantization", "int4"),
        ("device_states", "int4"),
    ],
)
def test_bad_settings_are_named(tmp_path, field, value):
    cfg = {"data_dir": str(tmp_path), "datasets": "x", "output_dir": str(tmp_path / "o"), "ratios": "4", field: value}
    with pytest.raises(SweepConfigError, match=field):
        Settings.from_config(cfg)


def test_quantized_results_are_kept_apart_from_float_ones(tmp_path):
    base = {"data_dir": str(tmp_path), "datasets": "x", "output_dir": str(tmp_path / "o"), "ratios": "4"}
    plain = Settings.from_config(base)
    assert "quantization" not in plain.identity()  # results of float weights keep their old identity
    results.check_output_dir(plain)
    int8 = Settings.from_config({**base, "quantization": "int8"})
    assert int8.identity()["quantization"] == "int8"
    with pytest.raises(SweepConfigError, match="quantization: results used None, now 'int8'"):
        results.check_output_dir(int8)


def test_int8_device_state_results_are_kept_apart(tmp_path):
    base = {"data_dir": str(tmp_path), "datasets": "x", "output_dir": str(tmp_path / "o"), "ratios": "4"}
    plain = Settings.from_config(base)
    assert plain.device_states == "compute" and "device_states" not in plain.identity()
    results.check_output_dir(plain)
    int8 = Settings.from_config({**base, "device_states": "int8"})
    assert int8.identity()["device_states"] == "int8"
    with pytest.raises(SweepConfigError, match="device_states: results used None, now 'int8'"):
        results.check_output_dir(int8)


def test_unreadable_sweep_config_is_named(tmp_path):
    s = Settings.from_config(
        {"data_dir": str(tmp_path), "datasets": "x", "output_dir": str(tmp_path / "o"), "ratios": "4"}
    )
    results.check_output_dir(s)
    (tmp_path / "o" / results.CONFIG_FILE).write_text("{truncated")
    with pytest.raises(SweepConfigError, match="sweep_config.json: not a valid sweep config"):
        results.check_output_dir(s)


def _near_tie_dataset(root):
    """A BEIR dataset of 6 queries whose first-stage scores differ only in the 8th decimal (rounding them to 6
    decimals makes them ties, which trec_eval breaks by descending doc id: the relevant doc then drops; trec_eval
    keeps scores as float32, which still tells them apart at this magnitude)."""
    d = root / "ties"
    (d / "qrels").mkdir(parents=True)
    docs = [f"d{i}" for i in range(8)]
    (d / "corpus.jsonl").write_text(
        "".join(json.dumps({"_id": x, "title": "", "text": f"text {x}"}) + "\n" for x in docs)
    )
    (d / "queries.jsonl").write_text(
        "".join(json.dumps({"_id": f"q{j}", "text": f"query {j}"}) + "\n" for j in range(6))
    )
    # the relevant doc (lowest id) is ahead by 3e-8 of docs with higher ids; other docs trail by whole points
    (d / "qrels" / "test.tsv").write_text(
        "query-id\tcorpus-id\tscore\n" + "".join(f"q{j}\td{j % 3}\t1\n" for j in range(6))
    )
    lines = []
    for j in range(6):
        rel = j % 3
        for i, x in enumerate(docs):
            score = 0.0123456789 + (3e-8 if i == rel else (-1e-8 * i if i > rel else -0.001 * (i + 1)))
            lines.append(f"q{j} Q0 {x} {i + 1} {score!r} bm25\n")
    (d / "first.trec").write_text("".join(lines))
    return d


def test_run_files_reproduce_results_exactly_also_after_a_resume(tmp_path):
    """Metrics recomputed by pytrec_eval from the written run file equal results.jsonl's exactly, with near-tied
    scores; a sweep resumed after a kill between writing the run and its row reports the same figures."""
    import pytrec_eval

    from kalm_jax.data.beir import load_qrels
    from kalm_jax.data.trec import read_run

    _near_tie_dataset(tmp_path)
    out = tmp_path / "out"
    cfg = {
        "data_dir": str(tmp_path),
        "datasets": "ties",
        "output_dir": str(out),
        "first_stage": "run:first.trec",
        "progress": False,
        "report": False,
    }
    (row,) = run_sweep(cfg)
    written = read_run(out / row["run_file"])
    qrels = load_qrels(tmp_path / "ties" / "qrels" / "test.tsv")
    per_query = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut"}).evaluate(written)
    recomputed = sum(v["ndcg_cut_10"] for v in per_query.values()) / len(qrels)
    assert recomputed == row["metrics"]["ndcg_cut_10"] == 1.0
    assert written == read_run(tmp_path / "ties" / "first.trec")  # every score round-trips exactly
    (out / results.RESULTS).unlink()  # killed after the run file was cached, before its row was appended
    (again,) = run_sweep(cfg)
    assert again["metrics"] == row["metrics"]


def test_eval_cli_prints_a_data_error_as_one_line(tmp_path):
    """A user-facing error (bad input data) is one line on stderr and a non-zero exit; no traceback unless
    KALM_DEBUG=1."""
    import os
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    d = tmp_path / "broken"
    (d / "qrels").mkdir(parents=True)
    (d / "corpus.jsonl").write_text('{"_id": "d1", "title": "", "text": "alpha"}\n')
    (d / "queries.jsonl").write_text('{"_id": "q1", "text": "alpha?"}\n{"_id": "q2", "text": \n')
    (d / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\n")
    args = [
        sys.executable,
        str(repo / "eval.py"),
        f"--config.data_dir={tmp_path}",
        "--config.datasets=broken",
        f"--config.output_dir={tmp_path / 'out'}",
        "--config.progress=False",
    ]
    env = {**os.environ, "PYTHONPATH": str(repo), "JAX_PLATFORMS": "cpu"}
    env.pop("KALM_DEBUG", None)
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert f"{d / 'queries.jsonl'}:2: malformed JSON" in proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    debug = subprocess.run(args, env={**env, "KALM_DEBUG": "1"}, capture_output=True, text=True, timeout=300)
    assert debug.returncode == proc.returncode and "Traceback" in debug.stderr
