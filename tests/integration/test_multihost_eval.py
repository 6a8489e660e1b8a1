"""eval.py as 2 JAX processes x 2 CPU devices (kalm_jax.parallel.launch) against 1 process: the same metrics, a
store written by 2 processes that opens in 1 with the same states, and a sweep killed on all processes
that resumes with only the missing cells.

Three short runs on scifact (4 queries, top 10, a tiny random checkpoint, ratios 1, 4, 8): one process;
two processes killed (SIGKILL to the launcher, which takes its processes down) after the first rerank
cell; the same two-process command again.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import processes
import pytest
from child_process import child_env

from kalm_jax.checkpoints import orbax_io
from kalm_jax.evaluation import store as store_lib
from kalm_jax.model.build import build_model
from kalm_jax.model.config import get_preset

REPO = Path(__file__).resolve().parents[2]
TIMEOUT = 400
RATIOS = (1, 4, 8)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tokenizer):
    d = tmp_path_factory.mktemp("mh_ckpt") / "tiny"
    orbax_io.save_model(build_model(get_preset("tiny"), seed=11), d)
    shutil.copy(tokenizer.path, d / "tokenizer.model")
    return d


@pytest.fixture(scope="module")
def run_env():
    return processes.child_env()


def eval_args(ckpt: Path, data_dir: Path, out: Path) -> list[str]:
    return [
        "eval.py",
        f"--config.checkpoint={ckpt}",
        f"--config.data_dir={data_dir}",
        "--config.datasets=scifact",
        f"--config.output_dir={out}",
        f"--config.ratios={','.join(map(str, RATIOS))}",
        "--config.max_queries=4",
        "--config.top_k=10",
        "--config.max_document_tokens=64",
        "--config.progress=False",
        "--config.report=False",
    ]


def launcher(args: list[str]) -> list[str]:
    return processes.launcher(args, devices=2)


def rows_of(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]


def by_cell(rows: list[dict]) -> dict:
    return {(r["stage"], r["ratio"]): r for r in rows}


def open_store(out: Path) -> store_lib.PassageStore:
    root = next((out / "store").glob("*/scifact"))
    key = store_lib.StoreKey(**json.loads((root / store_lib.MANIFEST).read_text())["key"])
    return store_lib.PassageStore.open(root, key)


@pytest.fixture(scope="module")
def single(ckpt, data_dir, run_env, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval_one") / "out"
    env = child_env(devices=4)
    r = subprocess.run(
        [sys.executable, *eval_args(ckpt, data_dir, out)],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert r.returncode == 0, r.stderr[-4000:]
    return out


@pytest.fixture(scope="module")
def two(ckpt, data_dir, run_env, tmp_path_factory):
    """The two-process sweep killed after its first rerank cell, then rerun: (out, rows before the kill)."""
    out = tmp_path_factory.mktemp("eval_two") / "out"
    proc = subprocess.Popen(
        launcher(eval_args(ckpt, data_dir, out)),
        env=run_env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + TIMEOUT
    results = out / "results.jsonl"
    while not (results.exists() and '"rerank"' in results.read_text()):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(
                f"sweep ended (rc {proc.returncode}) before its first rerank cell:\n{proc.stdout.read()[-4000:]}"
            )
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)  # the launcher dies; its processes get SIGKILL with it (PR_SET_PDEATHSIG)
    proc.communicate(timeout=60)
    before = rows_of(out)
    assert len(before) < 1 + len(RATIOS), "the sweep finished before it could be killed"
    r = subprocess.run(
        launcher(eval_args(ckpt, data_dir, out)), env=run_env, cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT
    )
    assert r.returncode == 0, r.stdout[-4000:]
    return out, before


def test_two_processes_write_the_same_metrics_as_one(single, two):
    one, out = by_cell(rows_of(single)), rows_of(two[0])
    assert len(out) == len({(r["stage"], r["ratio"]) for r in out}) == 1 + len(RATIOS)  # each cell written once
    for key, row in by_cell(out).items():
        ref = one[key]["metrics"]
        assert row["metrics"].keys() == ref.keys()
        for name, value in row["metrics"].items():
            assert value == ref[name], (key, name)  # identical margins, so identical rankings
        if key[0] == "rerank":
            assert row["cost"]["processes"] == 2 and row["cost"]["pairs"] == one[key]["cost"]["pairs"]


def test_killed_sweep_resumes_with_only_the_missing_cells(two):
    out, before = two
    after = rows_of(out)
    assert after[: len(before)] == before  # finished cells kept as they were
    for row in after[len(before) :]:
        assert row["stage"] == "rerank" and row["cost"]["encoded_passages"] == 0  # the store was not re-encoded


def test_store_written_by_two_processes_opens_in_one(single, two):
    mine, theirs = open_store(single), open_store(two[0])
    names = [s["name"] for s in theirs.shards]
    assert any(n.endswith("-p0") for n in names) and any(n.endswith("-p1") for n in names), names
    ids = sorted(mine.index)
    assert sorted(theirs.index) == ids and len(ids) > 0
    for ratio in RATIOS:
        a, b = mine.lookup(ids, ratio), theirs.lookup(ids, ratio)
        assert list(b.ids) == ids
        np.testing.assert_array_equal(b.states, a.states)
        np.testing.assert_array_equal(b.mask, a.mask)
        np.testing.assert_array_equal(b.counts, a.counts)
