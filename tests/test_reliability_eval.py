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
    with output_lock(tmp_path):
        with pytest.raises(OutputDirLocked, match=f"pid "):
            with output_lock(tmp_path):
                pass
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, sys, time; f = open(sys.argv[1], 'a+'); fcntl.flock(f, fcntl.LOCK_EX); "
        "print('locked', flush=True); time.sleep(60)"), str(tmp_path / results.LOCK_FILE)],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(OutputDirLocked):
        with output_lock(tmp_path):
            pass
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with output_lock(tmp_path):  # a killed run leaves no stale lock
        pass


def test_run_sweep_refuses_a_directory_in_use(tmp_path, data_dir):
    cfg = {"data_dir": str(data_dir), "datasets": "scifact", "output_dir": str(tmp_path / "out"), "ratios": "4",
           "progress": False, "report": False}
    with output_lock(tmp_path / "out"):
        t0 = time.perf_counter()
        with pytest.raises(OutputDirLocked, match="in use by another run"):
            run_sweep(cfg)
        assert time.perf_counter() - t0 < 5
    assert not (tmp_path / "out" / results.RESULTS).exists()


@pytest.mark.parametrize("field,value", [("max_queries", -3), ("relevance_level", -1), ("max_document_tokens", -1),
                                         ("batch_pairs", 0), ("encode_batch_size", 0), ("top_k", 2.5),
                                         ("shard_size", True)])
def test_bad_settings_are_named(tmp_path, field, value):
    cfg = {"data_dir": str(tmp_path), "datasets": "x", "output_dir": str(tmp_path / "o"), "ratios": "4", field: value}
    with pytest.raises(SweepConfigError, match=field):
        Settings.from_config(cfg)


def test_unreadable_sweep_config_is_named(tmp_path):
    s = Settings.from_config({"data_dir": str(tmp_path), "datasets": "x", "output_dir": str(tmp_path / "o"),
                              "ratios": "4"})
    results.check_output_dir(s)
    (tmp_path / "o" / results.CONFIG_FILE).write_text("{truncated")
    with pytest.raises(SweepConfigError, match="sweep_config.json: not a valid sweep config"):
        results.check_output_dir(s)
