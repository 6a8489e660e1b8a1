"""train.py as 2 JAX processes x 4 CPU devices (kalm_jax.parallel.launch) against 1 process x 8 devices.

Five short runs of the tiny preset (6 steps, global batch 8): one process straight; two processes
straight; two processes stopped by a SIGTERM to process 1 after step 2 (both save at the same step),
resumed, SIGKILLed (process 1) after the step-4 checkpoint, and resumed again. The per-step losses of every
two-process run match the one-process run within 1e-5; the interrupted run ends bit-identical to the straight one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import numpy as np
import processes
import pytest
from child_process import child_env

from kalm_jax.checkpoints import orbax_io

REPO = Path(__file__).resolve().parents[2]
STEPS = 6
TIMEOUT = 400


@pytest.fixture(scope="module")
def train_jsonl(data_dir, tmp_path_factory):
    """40 scifact training queries, each with its judged passage and 3 random negatives."""
    return processes.write_scifact_training(data_dir, tmp_path_factory.mktemp("mh_train") / "train.jsonl")


@pytest.fixture(scope="module")
def run_env():
    return processes.child_env()


@pytest.fixture(scope="module")
def train_args(train_jsonl, tokenizer, data_dir):
    return [
        f"--config={REPO}/configs/train.py:tiny",
        f"--config.total_steps={STEPS}",
        "--config.checkpoint.every=2",
        "--config.eval.num_queries=0",
        f"--config.data.train_jsonl=('{train_jsonl}',)",
        f"--config.tokenizer={tokenizer.path}",
        "--config.data.batch_size=8",
        "--config.data.group_size=2",
        "--config.data.max_document_tokens=32",
        "--config.data.max_query_tokens=8",
        "--config.mep.ratios=(1,4)",
        "--config.optimizer.warmup_steps=2",
        f"--config.data.data_dir={data_dir}",
        "--config.tensorboard=False",
    ]


def launcher(workdir: Path, args: list[str]) -> list[str]:
    return processes.launcher(["train.py", *args, f"--workdir={workdir}"])


def losses(workdir: Path) -> list[float]:
    lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == list(range(1, STEPS + 1))
    return [x["loss"] for x in lines]


def checkpoint_steps(workdir: Path) -> list[int]:
    root = workdir / "checkpoints"
    return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit() and (p / "commit_success.txt").exists())


def final_params(workdir: Path) -> list[np.ndarray]:
    _, model = orbax_io.load_any(workdir)
    return jax.tree.leaves(orbax_io.param_tree(model))


def child_pid(launcher_pid: int, process_id: int) -> int:
    """PID of the launcher's child started with --process_id=`process_id`."""
    children = Path(f"/proc/{launcher_pid}/task/{launcher_pid}/children").read_text().split()
    for pid in children:
        if f"--process_id={process_id}" in Path(f"/proc/{pid}/cmdline").read_bytes().decode().replace("\0", " "):
            return int(pid)
    raise AssertionError(f"no child with --process_id={process_id} among {children}")


def wait_for(cond, proc: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not cond():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            out = proc.stdout.read() if proc.stdout else ""
            raise AssertionError(f"launcher ended (rc {proc.returncode}) before {what}:\n{out[-4000:]}")
        time.sleep(0.02)


def finish(proc: subprocess.Popen) -> str:
    try:
        out, _ = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # the launcher stops its processes
        out, _ = proc.communicate(timeout=30)
        raise
    return out


def popen(cmd: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def one_process(workdir: Path, args: list[str], env: dict) -> str:
    """train.py ARGS as one process on 8 CPU devices; returns its output (stdout and stderr)."""
    env = dict(env, XLA_FLAGS=child_env(devices=8)["XLA_FLAGS"])
    r = subprocess.run(
        [sys.executable, "train.py", *args, f"--workdir={workdir}"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    return r.stdout + r.stderr


@pytest.fixture(scope="module")
def single(train_args, run_env, tmp_path_factory):
    w = tmp_path_factory.mktemp("one_process")
    one_process(w, train_args, run_env)
    return w


@pytest.fixture(scope="module")
def straight(train_args, run_env, tmp_path_factory):
    w = tmp_path_factory.mktemp("two_processes")
    out = finish(popen(launcher(w, train_args), run_env))
    assert "[launch] done, exit status 0" in out, out[-4000:]
    return w, out


def test_two_processes_log_the_same_losses_as_one(single, straight):
    w, out = straight
    np.testing.assert_allclose(losses(w), losses(single), rtol=0, atol=1e-5)
    assert "[p0] mesh {'data': 8, 'fsdp': 1, 'tensor': 1} over 8 cpu devices" in out
    assert checkpoint_steps(w) == [2, 4, 6]
    for step in (2, 4, 6):  # every process saved its own data-iterator position into the shared step
        names = sorted(p.name for p in (w / "checkpoints" / str(step) / "data_iter").glob("process_*.json"))
        assert names == ["process_0-of-2.json", "process_1-of-2.json"]


def mesh(data: int, fsdp: int, tensor: int) -> list[str]:
    return [f"--config.mesh.data={data}", f"--config.mesh.fsdp={fsdp}", f"--config.mesh.tensor={tensor}"]


def test_losses_do_not_depend_on_the_mesh(single, train_args, run_env, tmp_path):
    """The global batch of every step is the same records for any mesh and process count (one permutation of
    the records per epoch, each batch shard taking its rows): 2x4 (4,2,1) logs the losses of 1x8 (8,1,1) to fp32
    rounding. 1x8 (2,2,2) (4 batch shards, tensor-parallel) does too, from a resumed step 2 on:
    `test_resume_on_another_mesh_and_process_count`."""
    # losses only: no step-2 / step-4 checkpoints to write (the last step's is)
    args = [a for a in train_args if not a.startswith("--config.checkpoint.every")]
    args.append(f"--config.checkpoint.every={STEPS}")
    out = finish(popen(launcher(tmp_path / "mesh421", [*args, *mesh(4, 2, 1)]), run_env))
    assert "[launch] done, exit status 0" in out and "[p0] mesh {'data': 4, 'fsdp': 2, 'tensor': 1}" in out, out[-4000:]
    np.testing.assert_allclose(losses(tmp_path / "mesh421"), losses(single), rtol=0, atol=1e-5)


def test_resume_on_another_mesh_and_process_count(single, straight, train_args, run_env, tmp_path):
    """Steps 1-2 on 2 processes x 4 devices (8,1,1), steps 3-6 resumed on 1 process x 8 devices (2,2,2): the
    data-iterator state saved per process continues the same example order, so every step's loss equals the
    straight run's."""
    w = tmp_path / "moved"
    shutil.copytree(straight[0], w, ignore=shutil.ignore_patterns("tensorboard"))
    for step in (4, 6):  # the job stopped after the step-2 checkpoint
        shutil.rmtree(w / "checkpoints" / str(step))
    assert checkpoint_steps(w) == [2]
    assert sorted(p.name for p in (w / "checkpoints/2/data_iter").glob("process_*.json")) == [
        "process_0-of-2.json",
        "process_1-of-2.json",
    ]
    logged = (w / "metrics.jsonl").read_text().splitlines()[:2]
    out = one_process(w, [*train_args, *mesh(2, 2, 2)], run_env)
    assert "mesh {'data': 2, 'fsdp': 2, 'tensor': 2} over 8 cpu devices" in out, out[-4000:]
    assert (w / "metrics.jsonl").read_text().splitlines()[:2] == logged  # resumed at step 2
    np.testing.assert_allclose(losses(w), losses(single), rtol=0, atol=1e-5)


def test_sigterm_stop_sigkill_and_resume(single, straight, train_args, run_env, tmp_path):
    w = tmp_path / "interrupted"
    # 1. SIGTERM to process 1 only, once step 2 is logged: both processes save the same step (2, or 3 when
    #    process 1 had already passed its step-2 stop check) and exit 0.
    proc = popen(launcher(w, train_args), run_env)
    wait_for(
        lambda: (w / "metrics.jsonl").exists() and (w / "metrics.jsonl").read_text().count("\n") >= 2, proc, "step 2"
    )
    os.kill(child_pid(proc.pid, 1), signal.SIGTERM)
    out = finish(proc)
    assert proc.returncode == 0, out[-4000:]
    stops = {m.group(1): int(m.group(2)) for m in re.finditer(r"\[(p\d)\].*preempted at step (\d+)", out)}
    assert set(stops) == {"p0", "p1"} and len(set(stops.values())) == 1, stops
    stop = stops["p0"]
    assert 2 <= stop < 4, f"stopped at step {stop}"
    assert checkpoint_steps(w)[-1] == stop
    # 2. Resume; SIGKILL process 1 once the step-4 checkpoint is complete: the launcher stops the job.
    proc = popen(launcher(w, train_args), run_env)
    wait_for(lambda: 4 in checkpoint_steps(w), proc, "the step-4 checkpoint")
    os.kill(child_pid(proc.pid, 1), signal.SIGKILL)
    out = finish(proc)
    assert proc.returncode == 128 + signal.SIGKILL, out[-4000:]
    assert "[launch] process 1 failed (exit status 137); stopping the others" in out
    assert STEPS not in checkpoint_steps(w), "the run finished before it could be killed"
    # 3. Rerun: resumes from the last complete checkpoint and ends where the straight run ended, bit for bit.
    logged = (w / "metrics.jsonl").read_text().splitlines()[:4]
    out = finish(popen(launcher(w, train_args), run_env))
    assert "[launch] done, exit status 0" in out, out[-4000:]
    assert (w / "metrics.jsonl").read_text().splitlines()[:4] == logged  # steps 1-4 kept (timings too): resumed at 4
    np.testing.assert_allclose(losses(w), losses(single), rtol=0, atol=1e-5)
    for x, y in zip(final_params(straight[0]), final_params(w)):
        np.testing.assert_array_equal(x, y)


def test_dev_evaluation_runs_on_two_processes(train_args, run_env, tmp_path):
    """The sized presets evaluate dev nDCG@10 during training. With the weights sharded over both processes
    (mesh fsdp=8), dev evaluation scores on the training mesh with the state's own arrays (no gather of the
    weights; tests/training/test_dev_eval.py checks none is copied or read to the host) and logs what one process
    logs. The dev set is adi's first 3 test queries (BM25 over its 82 passages, not scifact's 5183 in each
    process): two of them have a judged passage among their top 4 (first and fourth), so the reranked nDCG depends on
    the margins."""
    args = [a for a in train_args if not a.startswith(("--config.eval.num_queries", "--config.total_steps"))]
    args += [
        "--config.total_steps=2",
        "--config.eval.dataset=adi",
        "--config.eval.num_queries=3",
        "--config.eval.depth=4",
        "--config.mesh.data=1",
        "--config.mesh.fsdp=8",
    ]
    w = tmp_path / "dev"
    proc = subprocess.run(launcher(w, args), env=run_env, capture_output=True, text=True, timeout=TIMEOUT, cwd=REPO)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "[p0] mesh {'data': 1, 'fsdp': 8, 'tensor': 1} over 8 cpu devices" in proc.stdout
    one = tmp_path / "dev_one"
    one_process(one, args, run_env)
    rows = [json.loads(x) for x in (w / "metrics.jsonl").read_text().splitlines()]
    ref = [json.loads(x) for x in (one / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in rows] == [x["step"] for x in ref] == [0, 1, 2]
    assert 0.0 <= rows[-1]["dev_ndcg@10"] <= 1.0
    # the same initial weights: the same dev metrics exactly; after two steps the weights agree to fp32 rounding
    for key in ("initial_dev_ndcg@10", "initial_dev_bm25_ndcg@10"):
        assert rows[0][key] == ref[0][key], key
    for key in ("dev_ndcg@10", "dev_bm25_ndcg@10"):
        assert rows[-1][key] == pytest.approx(ref[-1][key], abs=1e-6), key


def test_locked_workdir_stops_every_process_naming_the_holder(train_args, run_env, tmp_path):
    """Two processes on a workdir another run holds: process 0 cannot take `<workdir>/.lock`, every process
    learns it and the job exits 2 at once naming the holder; nothing is prepared in the workdir."""
    w = tmp_path / "locked"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            (
                "import sys, time\nfrom kalm_jax.locks import exclusive_lock\n"
                "with exclusive_lock(sys.argv[1], 'training run'):\n"
                "    print('locked', flush=True)\n    time.sleep(600)"
            ),
            str(w),
        ],
        env=run_env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        t0 = time.monotonic()
        out = finish(popen(launcher(w, train_args), run_env))
        assert f"is in use by another training run (pid {holder.pid} on " in out, out[-4000:]
        assert "[launch] done, exit status 2" in out, out[-4000:]
        assert sorted(p.name for p in w.iterdir()) == [".lock"]
        assert time.monotonic() - t0 < TIMEOUT
    finally:
        holder.kill()
        holder.wait()


def test_a_process_late_to_the_first_step_does_not_fail_the_job(train_args, run_env, tmp_path):
    """Process 1 reaches the first train step 35 s after process 0 (a slower compile on a loaded host, a
    compilation cache hit on one process only): the step's cross-process communicator (gloo on CPU), created
    at the step's first run, gave up after 30 s ("Gloo context initialization failed: DEADLINE_EXCEEDED").
    Every process now compiles the step, then they meet at a host-side barrier before its first run."""
    wrapper = tmp_path / "late_train.py"
    wrapper.write_text(
        textwrap.dedent(f"""
        import runpy, sys, time
        from kalm_jax.training import loop
        first = loop.global_batch
        def late(local, ts):  # process 1's first batch comes 35 s late
            loop.global_batch = first
            if "--process_id=1" in sys.argv:
                time.sleep(35)
            return first(local, ts)
        loop.global_batch = late
        sys.argv[0] = {str(REPO / "train.py")!r}
        runpy.run_path(sys.argv[0], run_name="__main__")
    """)
    )
    w = tmp_path / "late"
    args = [a for a in train_args if not a.startswith("--config.total_steps")] + ["--config.total_steps=2"]
    cmd = launcher(w, args)
    cmd[cmd.index("train.py")] = str(wrapper)
    proc = subprocess.run(cmd, env=run_env, capture_output=True, text=True, timeout=TIMEOUT, cwd=REPO)
    errors = [line for line in proc.stdout.splitlines() if "Error" in line and "File " not in line][:10]
    assert proc.returncode == 0, "\n".join(errors) + "\n...\n" + (proc.stdout + proc.stderr)[-3000:]
    assert [json.loads(x)["step"] for x in (w / "metrics.jsonl").read_text().splitlines()] == [1, 2]
