"""Development launcher: one command as N JAX processes on this machine, with fake CPU devices.

    kalm-launch -n 2 [--devices_per_process 4] -- train.py --config=train.py:tiny --workdir=W
    kalm-launch -n 2 -- eval.py --config.output_dir=OUT ...
    kalm-launch -n 2 -- -m kalm_jax.cli.label --config.teacher=T --config.input=I --config.output=O

Process i runs the command (a `.py` file or `-m module` gets this Python) with
`--coordinator_address=127.0.0.1:PORT --num_processes=N --process_id=i` appended (PORT: a free port),
JAX_PLATFORMS=cpu and XLA_FLAGS=--xla_force_host_platform_device_count=M. Each output line is prefixed
with `[pI]`. The coordinator listens on 127.0.0.1 only. SIGINT / SIGTERM to the launcher are forwarded to
every process (a training run saves and exits); processes still running `--grace` seconds later are
SIGKILLed. When one process fails, the others get SIGTERM, then SIGKILL after `--grace` seconds, and the
launcher exits with the failing status (128 + signal for a killed process). This is JAX's own runtime
(`kalm_jax.parallel.distributed.initialize`); on a real cluster run the command once per host instead (see
docs/multihost.md).
"""

from __future__ import annotations

import contextlib
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_command(command: list[str]) -> list[str]:
    """A `.py` script or `-m module` runs under this Python; anything else is an executable."""
    if command and (command[0] == "-m" or command[0].endswith(".py")):
        return [sys.executable, *command]
    return list(command)


def child_env(devices_per_process: int, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of one process: CPU platform, M fake devices, unbuffered output."""
    env = dict(os.environ if base is None else base)
    flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", env.get("XLA_FLAGS", "")).strip()
    env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices_per_process}".strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _die_with_parent() -> None:
    """Child pre-exec: own session (terminal signals reach only the launcher) and SIGKILL if it dies."""
    os.setsid()
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _pump(stream, prefix: str, lock: threading.Lock) -> None:
    for raw in iter(stream.readline, b""):
        line = raw.decode("utf-8", "replace").rstrip("\n")
        with lock:
            sys.stdout.write(f"{prefix}{line}\n")
            sys.stdout.flush()
    stream.close()


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    """Signals the process's group (its session: the process and anything it started), if any is left."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def _wait(i: int, proc: subprocess.Popen, exits: queue.Queue) -> None:
    exits.put((i, proc.wait()))


def exit_status(rc: int) -> int:
    """A Popen return code as a shell exit status (killed by signal s -> 128 + s)."""
    return 128 - rc if rc < 0 else rc


def launch(
    command: list[str], num_processes: int, devices_per_process: int, *, port: int | None = None, grace: float = 10.0
) -> int:
    """Runs `command` as `num_processes` JAX processes; returns the job's exit status (0: all succeeded)."""
    if num_processes < 1 or devices_per_process < 1:
        raise ValueError(f"-n ({num_processes}) and --devices_per_process ({devices_per_process}) must be >= 1")
    if port is not None and not 1 <= port <= 65535:
        raise ValueError(f"--port {port} is not a TCP port (1..65535)")
    if not command:
        raise ValueError("no command given after --")
    # 127.0.0.1: kalm_jax.parallel.distributed.initialize binds the coordination service to this loopback address.
    address = f"127.0.0.1:{port or free_port()}"
    env = child_env(devices_per_process)
    lock = threading.RLock()  # re-entrant: the signal handler prints under it in the main thread, which may hold it
    procs: list[subprocess.Popen] = []
    pumps: list[threading.Thread] = []
    running: set[int] = set()
    received: list[int] = []  # the signals forwarded
    kill_at = None  # when the processes still running get SIGKILL: --grace after a forwarded signal or a failure

    def forward(signum, frame):
        nonlocal kill_at
        received.append(signum)
        with lock:
            print(
                f"[launch] {signal.Signals(signum).name}: forwarding to all processes (SIGKILL to those left "
                f"after {grace:g} s)",
                flush=True,
            )
        for i in sorted(running):
            _signal_group(procs[i], signum)
        if kill_at is None:
            kill_at = time.monotonic() + grace

    # The handlers go in before the first process starts: a signal that arrives while they start (a process
    # may print before this thread gets here again) is forwarded, not the launcher's own death.
    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    status = 0
    failed = False
    try:
        for i in range(num_processes):
            if kill_at is not None:  # signalled while starting: start no more
                break
            argv = child_command(command) + [
                f"--coordinator_address={address}",
                f"--num_processes={num_processes}",
                f"--process_id={i}",
            ]
            # stdout and stderr on pipes of their own, each pumped line by line: on one shared pipe, text a
            # library writes to stderr without a newline (gloo's "connected to 1 peer ranks") joined the next
            # stdout line. Both are printed to the launcher's stdout, prefixed.
            p = subprocess.Popen(
                argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=_die_with_parent
            )
            procs.append(p)
            running.add(i)
            for stream in (p.stdout, p.stderr):
                t = threading.Thread(target=_pump, args=(stream, f"[p{i}] ", lock), daemon=True)
                t.start()
                pumps.append(t)
        with lock:
            print(
                f"[launch] {num_processes} processes x {devices_per_process} CPU devices, coordinator {address}: "
                f"{' '.join(command)}",
                flush=True,
            )

        # One waiter thread per process reports its exit to `exits` as it happens, so the failure reported is the
        # first one, not the lowest-numbered process among several that died within one polling interval (a
        # killed process's peers abort from the distributed runtime milliseconds later).
        exits: queue.Queue = queue.Queue()
        for i, p in enumerate(procs):
            threading.Thread(target=_wait, args=(i, p, exits), daemon=True).start()
        if received and len(procs) < num_processes:  # stopped before every process started
            status = exit_status(-received[0])
        while running:
            try:
                i, rc = exits.get(timeout=0.1)
            except queue.Empty:
                if kill_at is not None and time.monotonic() >= kill_at:
                    with lock:
                        print(
                            f"[launch] grace of {grace:g} s over: SIGKILL to process "
                            f"{', '.join(map(str, sorted(running)))}",
                            flush=True,
                        )
                    for j in sorted(running):
                        _signal_group(procs[j], signal.SIGKILL)
                    kill_at = float("inf")
                continue
            running.discard(i)
            if rc != 0 and not failed:
                failed = True
                status = exit_status(rc)
                with lock:
                    print(f"[launch] process {i} failed (exit status {status}); stopping the others", flush=True)
                for j in sorted(running):
                    _signal_group(procs[j], signal.SIGTERM)
                if kill_at is None:
                    kill_at = time.monotonic() + grace
    finally:
        for j in sorted(running):  # only on an error in this loop
            _signal_group(procs[j], signal.SIGKILL)
        for p in procs:
            p.wait()
        for s, h in old.items():
            signal.signal(s, h)
        for t in pumps:
            t.join(timeout=5)
    with lock:
        print(f"[launch] done, exit status {status}", flush=True)
    return status
