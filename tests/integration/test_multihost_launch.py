"""Multi-process building blocks, fast: the launcher (prefixes, a failure stops the job, SIGTERM forwarding,
a 2-process global sum on JAX's runtime), flag validation, per-process data shards (disjoint, complete,
independent of the process count) and the shard-local passage gather (no all-gather)."""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from processes import child_env

from kalm_jax.data.pipeline import CollateGroups, PipelineConfig, ShardedBatchSampler
from kalm_jax.parallel import distributed
from kalm_jax.training.step import gather_rows

REPO = Path(__file__).resolve().parents[2]


def env() -> dict:
    return child_env()


def launch(args: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "kalm_jax.cli.launch", *args],
        env=env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )


def test_output_lines_of_stdout_and_stderr_stay_apart(tmp_path):
    """A library's stderr text without a newline (gloo's "connected to 1 peer ranks") must not join the
    process's next stdout line."""
    script = tmp_path / "mixed.py"
    script.write_text(
        textwrap.dedent("""
        import sys, time
        sys.stderr.write("[lib] no newline"); sys.stderr.flush()
        time.sleep(0.2)
        print("RESULT", sys.argv[-1], flush=True)
    """)
    )
    r = launch(["-n", "2", "--devices_per_process", "1", "--", str(script)])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    lines = r.stdout.splitlines()
    assert sorted(line for line in lines if "RESULT" in line) == [
        "[p0] RESULT --process_id=0",
        "[p1] RESULT --process_id=1",
    ], lines
    assert sorted(line for line in lines if "[lib]" in line) == ["[p0] [lib] no newline", "[p1] [lib] no newline"]


def test_two_processes_sum_a_global_array(tmp_path):
    script = tmp_path / "sum.py"
    script.write_text(
        textwrap.dedent("""
        from kalm_jax import cli
        from kalm_jax.parallel import distributed
        _, a = cli.parse(__import__("sys").argv[1:], "label.py", flags=cli.DISTRIBUTED_FLAGS)
        assert distributed.initialize(a["coordinator_address"], a["num_processes"], a["process_id"])
        import jax, jax.numpy as jnp, numpy as np
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
        mesh = Mesh(np.array(jax.devices()), ("d",))
        local = np.arange(jax.local_device_count(), dtype=np.float32) + 100 * jax.process_index()
        x = jax.make_array_from_process_local_data(NamedSharding(mesh, P("d")), local)
        total = jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P()))(x)
        print("RESULT", jax.process_index(), jax.process_count(), jax.device_count(), float(total),
              distributed.any_process(jax.process_index() == 1), distributed.is_primary())
        distributed.barrier("end")
    """)
    )
    r = launch(["-n", "2", "--devices_per_process", "3", "--", str(script)])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = sorted(line.split() for line in r.stdout.splitlines() if "RESULT" in line)
    # 6 devices: 0+1+2 + 100+101+102 = 306; stop flags agree; only process 0 is primary.
    assert rows == [
        ["[p0]", "RESULT", "0", "2", "6", "306.0", "True", "True"],
        ["[p1]", "RESULT", "1", "2", "6", "306.0", "True", "False"],
    ]


def test_one_failing_process_stops_the_job(tmp_path):
    script = tmp_path / "fail.py"
    # Process 1 fails once all three have started (a launcher that reacts at once would otherwise stop
    # the others before they print).
    script.write_text(
        textwrap.dedent(f"""
        import os, sys, time
        rank = int([a for a in sys.argv if a.startswith("--process_id=")][0].split("=")[1])
        print("started", rank, flush=True)
        open(os.path.join({str(tmp_path)!r}, f"started{{rank}}"), "w").close()
        if rank == 1:
            while not all(os.path.exists(os.path.join({str(tmp_path)!r}, f"started{{i}}")) for i in range(3)):
                time.sleep(0.01)
            sys.exit(3)
        time.sleep(120)
    """)
    )
    t0 = time.monotonic()
    r = launch(["-n", "3", "--grace", "1", "--", str(script)], timeout=60)
    assert r.returncode == 3, r.stdout
    assert time.monotonic() - t0 < 30
    for i in range(3):
        assert f"[p{i}] started {i}" in r.stdout
    assert "process 1 failed (exit status 3); stopping the others" in r.stdout


def test_the_first_failure_is_reported_when_others_follow_at_once(tmp_path):
    """Process 1 exits 3; process 0 sees it and aborts 20 ms later, as a peer does when the distributed
    runtime loses a process: both exits fall in one 0.1 s poll of a polling launcher, which then reported the
    lowest-numbered failure (134) instead of the first (3)."""
    script = tmp_path / "cascade.py"
    flag = tmp_path / "dying"
    script.write_text(
        textwrap.dedent(f"""
        import os, sys, time
        rank = int([a for a in sys.argv if a.startswith("--process_id=")][0].split("=")[1])
        time.sleep(0.5)
        if rank == 1:
            open({str(flag)!r}, "w").close()
            os._exit(3)
        while not os.path.exists({str(flag)!r}):
            time.sleep(0.001)
        time.sleep(0.02)
        os.abort()
    """)
    )
    for _ in range(3):
        flag.unlink(missing_ok=True)
        r = launch(["-n", "2", "--grace", "1", "--", str(script)], timeout=60)
        assert r.returncode == 3, r.stdout
        assert "process 1 failed (exit status 3); stopping the others" in r.stdout
        assert "process 0 failed" not in r.stdout


def test_launcher_usage_errors():
    assert launch(["-n", "2", "train.py"]).returncode == 2
    assert launch(["-n", "0", "--", "train.py"]).returncode == 2


def test_partial_distributed_flags_are_rejected():
    with pytest.raises(ValueError, match="missing --num_processes, --process_id"):
        distributed.initialize("127.0.0.1:1234")
    with pytest.raises(ValueError, match=r"--process_id=2 is not in \[0, --num_processes=2\)"):
        distributed.initialize("127.0.0.1:1234", 2, 2)
    assert distributed.cluster_env() is None or os.environ.get("SLURM_JOB_ID")  # this test machine: no cluster
    assert distributed.initialize() is False  # one process: nothing started


# ------------------------------------------------------------------------------ per-process data shards
def _epoch(num_records: int, global_batch: int, shards: int, processes: int, steps: int):
    """Record keys and rngs of the first `steps` global batches, as `processes` hosts assemble them."""
    cfg = PipelineConfig(batch_size=global_batch // processes, group_size=2, batch_shards=shards // processes, seed=11)
    samplers = [ShardedBatchSampler(num_records, cfg, p, processes) for p in range(processes)]
    per_host = global_batch // processes
    batches = []
    for t in range(steps):  # the DataLoader visits p + m * processes for host p's m-th record
        rows = [samplers[p][p + (t * per_host + j) * processes] for p in range(processes) for j in range(per_host)]
        batches.append(([r.record_key for r in rows], [int(r.rng.integers(1 << 30)) for r in rows]))
    return batches, [
        [samplers[p][p + m * processes].record_key for m in range(steps * per_host)] for p in range(processes)
    ]


def test_process_shards_are_disjoint_complete_and_independent_of_process_count():
    n, b, d = 96, 8, 8  # 96 records, global batch 8, 8 batch shards -> 12 steps per epoch
    one, _ = _epoch(n, b, d, 1, 12)
    two, per_process = _epoch(n, b, d, 2, 12)
    four, _ = _epoch(n, b, d, 4, 12)
    assert one == two == four  # the same global batches (records and sampling rngs) for 1, 2 or 4 processes
    a, c = set(per_process[0]), set(per_process[1])
    assert len(per_process[0]) == len(a) == 48 and not a & c and a | c == set(range(n))
    assert sorted(k for keys, _ in one for k in keys) == list(range(n))  # one epoch: every record once
    assert _epoch(n, b, 2, 1, 12)[0] == _epoch(n, b, 4, 2, 12)[0] == one  # nor on the batch shards (the mesh)
    # The global stream is Grain's own IndexSampler over all records (record order and rngs).
    import grain

    ref = grain.samplers.IndexSampler(n, grain.sharding.NoSharding(), shuffle=True, seed=11)
    assert [k for keys, _ in one for k in keys] == [ref[i].record_key for i in range(n)]
    assert [r for _, rngs in one for r in rngs] == [int(ref[i].rng.integers(1 << 30)) for i in range(n)]


def test_collate_deduplicates_within_each_batch_shard():
    s = 3
    groups = []
    for q in range(4):  # queries 0, 1 share passage "7"; queries 2, 3 share it too (other shard)
        ids = np.array([[7, 7, 7], [10 + q, 1, 1]], np.int32)
        groups.append(
            {
                "enc_ids": ids,
                "enc_mask": np.ones_like(ids),
                "dec_ids": np.zeros(4, np.int32),
                "dec_mask": np.ones(4, np.int32),
                "labels": np.array([1, 0], np.float32),
                "teacher": np.zeros(2, np.float32),
                "teacher_mask": np.zeros(2, np.float32),
                "example_id": np.int32(q),
            }
        )
    whole, split = CollateGroups(0)(groups), CollateGroups(0, shards=2)(groups)
    assert whole["passage_index"].tolist() == [[0, 1], [0, 2], [0, 3], [0, 4]]
    assert split["passage_index"].tolist() == [[0, 1], [0, 2], [4, 5], [4, 6]]
    for out in (whole, split):  # every pair still reads its own passage
        got = out["enc_ids"][out["passage_index"].reshape(-1)].reshape(4, 2, s)
        np.testing.assert_array_equal(got, np.stack([g["enc_ids"] for g in groups]))


def test_shard_local_gather_has_no_all_gather():
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(8), ("data",))
    rows, width = 32, 5
    table_sh, index_sh = NamedSharding(mesh, P("data", None)), NamedSharding(mesh, P("data"))
    rng = np.random.default_rng(0)
    table = rng.normal(size=(rows, width)).astype(np.float32)
    index = (np.arange(rows) // 4 * 4 + rng.integers(0, 4, rows)).astype(np.int32)  # within each 4-row shard
    counts = {}
    for shards in (1, 8):
        f = jax.jit(
            functools.partial(lambda t, i, shards: gather_rows(jnp.tanh(t), i, shards), shards=shards),
            in_shardings=(table_sh, index_sh),
            out_shardings=table_sh,
        )
        np.testing.assert_allclose(f(table, index), np.tanh(table)[index], rtol=1e-6)
        counts[shards] = f.lower(table, index).compile().as_text().count("all-gather")
    assert counts[1] > 0 and counts[8] == 0, counts


def test_sigterm_to_the_launcher_reaches_every_process(tmp_path):
    script = tmp_path / "wait.py"
    script.write_text(
        textwrap.dedent("""
        import signal, sys, time
        rank = [a for a in sys.argv if a.startswith("--process_id=")][0].split("=")[1]
        got = []
        signal.signal(signal.SIGTERM, lambda s, f: got.append(s))
        print("ready", rank, flush=True)
        deadline = time.time() + 60
        while not got and time.time() < deadline:
            time.sleep(0.05)
        print("saved and exiting", rank, bool(got), flush=True)
    """)
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "kalm_jax.cli.launch", "-n", "2", "--", str(script)],
        env=env(),
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    lines = []
    while len([x for x in lines if "ready" in x]) < 2:
        line = proc.stdout.readline()
        assert line, "".join(lines)
        lines.append(line)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert "[p0] saved and exiting 0 True" in out and "[p1] saved and exiting 1 True" in out


# ------------------------------------------------------------------ host-side barriers, bind address, escalation
def test_a_barrier_outwaits_host_work_longer_than_the_first_collective_deadline(tmp_path):
    """Process 0 prepares for 35 s (mining, tokenizer training) while process 1 waits at the barrier; then both
    run a device collective. A barrier that was itself the first device collective died after 30 s
    ("Gloo context initialization failed: DEADLINE_EXCEEDED"). A barrier name used twice passes twice."""
    script = tmp_path / "slow_primary.py"
    script.write_text(
        textwrap.dedent("""
        import sys, time
        from kalm_jax import cli
        from kalm_jax.parallel import distributed
        _, a = cli.parse(sys.argv[1:], "label.py", flags=cli.DISTRIBUTED_FLAGS)
        assert distributed.initialize(a["coordinator_address"], a["num_processes"], a["process_id"])
        import jax, numpy as np
        from jax.experimental import multihost_utils
        t0 = time.monotonic()
        if jax.process_index() == 0:
            time.sleep(35)
        distributed.barrier("prepared")
        waited = time.monotonic() - t0
        total = int(np.sum(multihost_utils.process_allgather(np.int32(jax.process_index() + 1))))
        distributed.barrier("prepared")  # the same name again
        print("RESULT", jax.process_index(), total, waited > 34, flush=True)
    """)
    )
    r = launch(["-n", "2", "--devices_per_process", "2", "--", str(script)], timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = sorted(line.split() for line in r.stdout.splitlines() if "RESULT" in line)
    assert rows == [["[p0]", "RESULT", "0", "3", "True"], ["[p1]", "RESULT", "1", "3", "True"]], r.stdout[-3000:]


def test_a_barrier_timeout_names_the_barrier_and_the_missing_process(tmp_path):
    """KALM_BARRIER_TIMEOUT bounds the wait; the error names the barrier, the timeout and who did not arrive."""
    script = tmp_path / "late.py"
    script.write_text(
        textwrap.dedent("""
        import os, sys, time
        from kalm_jax import cli
        from kalm_jax.parallel import distributed
        _, a = cli.parse(sys.argv[1:], "label.py", flags=cli.DISTRIBUTED_FLAGS)
        assert distributed.initialize(a["coordinator_address"], a["num_processes"], a["process_id"])
        import jax
        if jax.process_index() == 1:
            time.sleep(5)  # past the 2 s barrier timeout below
        try:
            distributed.barrier("kalm_train_inputs_primary")
        except distributed.BarrierTimeout as e:
            print("TIMEOUT", jax.process_index(), e, flush=True)
        sys.stdout.flush()
        os._exit(0)
    """)
    )
    e = env()
    e["KALM_BARRIER_TIMEOUT"] = "2"
    r = subprocess.run(
        [sys.executable, "-m", "kalm_jax.cli.launch", "-n", "2", "--devices_per_process", "1", "--", str(script)],
        env=e,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    out = r.stdout
    line = [x for x in out.splitlines() if x.startswith("[p0] TIMEOUT 0")]
    assert line, out[-3000:] + r.stderr[-3000:]
    assert "barrier 'kalm_train_inputs_primary'" in line[0] and "within 2 s" in line[0], line[0]
    assert "not arrived: process 1" in line[0] and "KALM_BARRIER_TIMEOUT" in line[0], line[0]


def _listening(port: int) -> list:
    """Local addresses of the sockets listening on TCP `port` (/proc/net/tcp and tcp6, state 0A), as
    ipaddress objects (an IPv4-mapped IPv6 address as its IPv4 address)."""
    import ipaddress

    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        for row in Path(table).read_text().splitlines()[1:]:
            local, state = row.split()[1], row.split()[3]
            host, hexport = local.split(":")
            if state == "0A" and int(hexport, 16) == port:
                # 32-bit words in host (little-endian) byte order
                raw = b"".join(bytes.fromhex(host[i : i + 8])[::-1] for i in range(0, len(host), 8))
                addr = ipaddress.ip_address(raw)
                found.append(getattr(addr, "ipv4_mapped", None) or addr)
    return found


@pytest.mark.skipif(not os.path.exists("/proc/net/tcp"), reason="reads Linux's /proc/net/tcp")
def test_the_launchers_coordinator_listens_on_loopback_only(tmp_path):
    """The coordination service (unauthenticated gRPC) of a launcher job binds 127.0.0.1, not every interface."""
    from kalm_jax.parallel.launch import free_port

    port = free_port()
    script = tmp_path / "hold.py"
    flag = tmp_path / "checked"
    script.write_text(
        textwrap.dedent(f"""
        import os, sys, time
        from kalm_jax import cli
        from kalm_jax.parallel import distributed
        _, a = cli.parse(sys.argv[1:], "label.py", flags=cli.DISTRIBUTED_FLAGS)
        assert distributed.initialize(a["coordinator_address"], a["num_processes"], a["process_id"])
        print("ready", flush=True)
        deadline = time.time() + 60
        while not os.path.exists({str(flag)!r}) and time.time() < deadline:
            time.sleep(0.05)
    """)
    )
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "kalm_jax.cli.launch",
            "-n",
            "2",
            "--devices_per_process",
            "1",
            "--port",
            str(port),
            "--",
            str(script),
        ],
        env=env(),
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        lines = []
        while len([x for x in lines if "ready" in x]) < 2:
            line = proc.stdout.readline()
            assert line, "".join(lines)
            lines.append(line)
        hosts = _listening(port)
    finally:
        flag.touch()
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    # every interface would be 0.0.0.0 or :: (JAX's default bind address [::]:PORT)
    assert hosts and all(h.is_loopback for h in hosts), hosts


def test_only_a_loopback_coordinator_address_binds_loopback(monkeypatch):
    """A cluster's coordinator address keeps JAX's default bind (every interface: the other hosts connect)."""
    monkeypatch.delenv("JAX_COORDINATOR_BIND_ADDRESS", raising=False)
    bind = distributed.loopback_bind_address
    assert bind("127.0.0.1:1234") == "127.0.0.1:1234" and bind("localhost:1234") == "localhost:1234"
    assert bind("[::1]:1234") == "[::1]:1234"
    assert bind("10.0.0.1:1234") is None and bind("node-0.cluster:1234") is None and bind("") is None
    monkeypatch.setenv("JAX_COORDINATOR_BIND_ADDRESS", "10.0.0.1:1234")  # JAX's own setting wins
    assert bind("127.0.0.1:1234") is None


def test_the_launcher_kills_processes_that_ignore_a_forwarded_sigterm(tmp_path):
    """A process that ignores SIGTERM (hung, or JAX's preemption handler swallowing it) is SIGKILLed
    --grace seconds after the launcher forwarded the signal."""
    script = tmp_path / "stubborn.py"
    script.write_text(
        textwrap.dedent("""
        import signal, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print("ready", flush=True)
        time.sleep(120)
    """)
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "kalm_jax.cli.launch", "-n", "2", "--grace", "2", "--", str(script)],
        env=env(),
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    lines = []
    while len([x for x in lines if "ready" in x]) < 2:
        line = proc.stdout.readline()
        assert line, "".join(lines)
        lines.append(line)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        out, _ = proc.communicate(timeout=40)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    assert time.monotonic() - t0 < 2 + 15, out  # grace + a margin for a loaded machine
    assert proc.returncode == 128 + signal.SIGKILL, out
    assert "SIGKILL" in out, out


@pytest.mark.parametrize(
    "args, flag",
    [
        (["--port", "99999"], "--port"),
        (["--port", "0"], "--port"),
        (["--devices_per_process", "0"], "--devices_per_process"),
        (["--grace", "-1"], "--grace"),
    ],
)
def test_launcher_flag_errors_name_the_flag(args, flag):
    r = launch(["-n", "2", *args, "--", "train.py"], timeout=60)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "error:" in r.stderr and flag in r.stderr, r.stderr
