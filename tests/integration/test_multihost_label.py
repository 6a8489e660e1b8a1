"""`kalm-label` as 2 JAX processes x 4 CPU devices (kalm_jax.parallel.launch) against 1 process x 8.

40 scifact training groups (1 positive, up to 3 negatives) labelled by a tiny random teacher in shards of 2
examples (20 shards): one process; two processes (each scores only its contiguous half of the shards, the
output equals the one-process output); two processes SIGKILLed after a few shards, then the same command again
(only the shards not saved are scored, the output again equals the one-process output).
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from processes import child_env, launcher, write_scifact_training

from kalm_jax.checkpoints import orbax_io
from kalm_jax.data.training_jsonl import read_training_jsonl
from kalm_jax.model.build import build_model
from kalm_jax.model.config import get_preset
from kalm_jax.training.label import parts_dir

REPO = Path(__file__).resolve().parents[2]
TIMEOUT = 400
SHARD = 2
LOG = re.compile(r"\[(p\d)\] labelling: process (\d) of 2 scored (\d+) pairs in (\d+) shards \((\d+) of (\d+) shards")


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, tokenizer):
    d = tmp_path_factory.mktemp("label_teacher") / "tiny"
    orbax_io.save_model(build_model(get_preset("tiny"), seed=5), d)
    shutil.copy(tokenizer.path, d / "tokenizer.model")
    return d


@pytest.fixture(scope="module")
def train_jsonl(data_dir, tmp_path_factory):
    return write_scifact_training(data_dir, tmp_path_factory.mktemp("label_in") / "train.jsonl", seed=1)


@pytest.fixture(scope="module")
def run_env():
    return child_env()


def label_args(teacher: Path, src: Path, out: Path) -> list[str]:
    return [
        "-m",
        "kalm_jax.cli.label",
        f"--config.teacher={teacher}",
        f"--config.input={src}",
        f"--config.output={out}",
        "--config.max_document_tokens=32",
        "--config.max_query_tokens=16",
        f"--config.shard_size={SHARD}",
        "--config.batch_size=8",
    ]


def pair_counts(src: Path) -> list[int]:
    """Pairs per shard of `src`."""
    n = [len(ex.pos) + len(ex.neg) for ex in read_training_jsonl(src)]
    return [sum(n[a : a + SHARD]) for a in range(0, len(n), SHARD)]


def logged(out: str) -> dict[str, tuple[int, int, int, int]]:
    """{"p0": (pairs scored, shards scored, shards already done, shards), ...} from the processes' log lines."""
    got = {m.group(1): tuple(int(m.group(i)) for i in range(3, 7)) for m in LOG.finditer(out)}
    assert set(got) == {"p0", "p1"}, out[-4000:]
    return got


def assert_same_labels(a: Path, b: Path) -> None:
    x, y = read_training_jsonl(a), read_training_jsonl(b)
    assert len(x) == len(y) == 40
    for ex, ey in zip(x, y):
        assert (ex.query, ex.pos, ex.neg) == (ey.query, ey.pos, ey.neg)
        np.testing.assert_allclose(ex.pos_scores + ex.neg_scores, ey.pos_scores + ey.neg_scores, atol=1e-6, rtol=0)


@pytest.fixture(scope="module")
def single(teacher, train_jsonl, run_env, tmp_path_factory):
    out = tmp_path_factory.mktemp("label_one") / "labelled.jsonl"
    env = child_env(devices=8)
    r = subprocess.run(
        [sys.executable, *label_args(teacher, train_jsonl, out)],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert not parts_dir(out).exists()
    return out


def test_two_processes_each_label_their_half_and_write_what_one_process_writes(
    single, teacher, train_jsonl, run_env, tmp_path
):
    out = tmp_path / "labelled.jsonl"
    r = subprocess.run(
        launcher(label_args(teacher, train_jsonl, out)),
        env=run_env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    counts = pair_counts(train_jsonl)
    assert len(counts) == 20
    assert logged(r.stdout) == {"p0": (sum(counts[:10]), 10, 0, 20), "p1": (sum(counts[10:]), 10, 0, 20)}
    assert r.stdout.count("labelled 40 examples") == 1  # written once, by process 0
    assert_same_labels(out, single)  # to 1e-6 (4 devices per engine instead of 8: other per-device batch shapes)
    assert not parts_dir(out).exists()  # the shards are removed once the output is written


def test_killed_labelling_resumes_with_only_the_unfinished_shards(single, teacher, train_jsonl, run_env, tmp_path):
    out = tmp_path / "labelled.jsonl"
    parts = parts_dir(out)
    saved = lambda: sorted(p.name for p in parts.glob("shard-*.json")) if parts.is_dir() else []  # noqa: E731
    proc = subprocess.Popen(
        launcher(label_args(teacher, train_jsonl, out)),
        env=run_env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + TIMEOUT
    while len(saved()) < 3:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(
                f"labelling ended (rc {proc.returncode}) before 3 shards were saved:\n{proc.stdout.read()[-4000:]}"
            )
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)  # the launcher dies; its processes get SIGKILL with it (PR_SET_PDEATHSIG)
    proc.communicate(timeout=60)
    time.sleep(1)
    before = saved()
    assert not out.exists() and 3 <= len(before) < 20, before
    done = {int(name.split("-")[1]) for name in before}
    todo = [k for k in range(20) if k not in done]
    r = subprocess.run(
        launcher(label_args(teacher, train_jsonl, out)),
        env=run_env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    counts = pair_counts(train_jsonl)
    half = len(todo) // 2
    assert logged(r.stdout) == {
        "p0": (sum(counts[k] for k in todo[:half]), half, len(done), 20),
        "p1": (sum(counts[k] for k in todo[half:]), len(todo) - half, len(done), 20),
    }
    assert_same_labels(out, single)
    assert not parts.exists()
