"""Multi-process (multi-controller) start-up on JAX's own distributed runtime.

One JAX process per host (TPU pod worker, GPU node) or, for development, N processes on one machine
with fake CPU devices (`kalm-launch`). Every CLI calls `initialize` first, before any JAX
computation:

    initialize("10.0.0.1:1234", num_processes=4, process_id=i)   # explicit: jax.distributed.initialize(...)
    initialize()          # auto: a cluster environment (see `cluster_env`) -> jax.distributed.initialize();
                          #       otherwise one process and nothing is called

CPU collectives across processes use gloo (`jax_cpu_collectives_implementation`), set before the
runtime starts; it only concerns the CPU backend, so it is harmless on TPU and GPU. On CPU, `initialize`
runs one tiny collective at once, so gloo's context (whose creation fails when a process comes more than
30 s after the others) exists before any process starts long host-side work.

Barriers (`barrier`, `primary_first`) wait for host-side work (process 0 mining negatives, training the
tokenizer, writing a manifest) on the coordination service, never in a device collective, for at most
KALM_BARRIER_TIMEOUT seconds (default 3600); a timeout is a `BarrierTimeout` naming the barrier and the
processes that did not arrive. A coordinator address on loopback (127.0.0.1, localhost, ::1: the launcher's)
binds the coordination service to that address only; any other address keeps JAX's default (every
interface) or JAX_COORDINATOR_BIND_ADDRESS.

The three flags `--coordinator_address`, `--num_processes`, `--process_id` of every CLI are
`kalm_jax.cli.DISTRIBUTED_FLAGS`; the CLI passes their values to `initialize`.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
from collections.abc import Callable
from typing import Any, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")

BARRIER_TIMEOUT_ENV = "KALM_BARRIER_TIMEOUT"
"""Seconds a process waits at a barrier for the others (default `DEFAULT_BARRIER_TIMEOUT`)."""
DEFAULT_BARRIER_TIMEOUT = 3600.0


class BarrierTimeout(RuntimeError):
    """Some process did not reach a barrier within the barrier timeout."""


def _int_env(name: str) -> int:
    try:
        return int(os.environ.get(name, "") or 0)
    except ValueError:
        return 0


def _hosts(value: str) -> list[str]:
    """The non-empty entries of a comma-separated host list."""
    return [h for h in (x.strip() for x in value.split(",")) if h]


def cluster_env() -> str | None:
    """Name of the multi-process environment this process runs in, or None (single process).

    Checked, in order: JAX_COORDINATOR_ADDRESS (set by hand or by a scheduler), SLURM with more than one
    task, Open MPI with more than one rank, a TPU VM (GKE: TPU_WORKER_HOSTNAMES / TPU_PROCESS_ADDRESSES listing
    more than one host; Cloud TPU VM: JAX's metadata-server detection). JAX's own cluster detection then fills
    in the values.
    """
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        return "JAX_COORDINATOR_ADDRESS"
    if os.environ.get("SLURM_JOB_ID") and max(_int_env("SLURM_NTASKS"), _int_env("SLURM_NPROCS")) > 1:
        return "slurm"
    if _int_env("OMPI_COMM_WORLD_SIZE") > 1:
        return "openmpi"
    # GKE TPU workers: several hosts listed (one host, e.g. the local description `extras.quiet_libtpu_without_tpu`
    # gives libtpu on a machine without a TPU, is a single process)
    if any(len(_hosts(os.environ.get(k, ""))) > 1 for k in ("TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES")):
        return "tpu"
    try:  # private, but it is the only way to tell a Cloud TPU VM without querying its metadata server
        from jax._src.clusters.cloud_tpu_cluster import running_in_cloud_tpu_vm
    except ImportError:
        return None
    return "tpu" if running_in_cloud_tpu_vm else None


def initialize(
    coordinator_address: str | None = None, num_processes: int | None = None, process_id: int | None = None
) -> bool:
    """Starts JAX's distributed runtime when the job has several processes; returns whether it did.

    Explicit values (all three, or a coordinator with num_processes=1) are passed to
    `jax.distributed.initialize`. With none given, a detected cluster environment (`cluster_env`) gets
    `jax.distributed.initialize()` and JAX's own detection; otherwise nothing happens (one process).
    Must run before any JAX computation. Idempotent.

    Raises:
      ValueError: some but not all of the three values given, or process_id outside [0, num_processes).
    """
    import jax

    given = {"coordinator_address": coordinator_address, "num_processes": num_processes, "process_id": process_id}
    if any(v is not None for v in given.values()):
        missing = [f"--{k}" for k, v in given.items() if v is None]
        if missing:
            raise ValueError(
                f"multi-process start needs --coordinator_address, --num_processes and --process_id; "
                f"missing {', '.join(missing)}"
            )
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise ValueError(f"--process_id={process_id} is not in [0, --num_processes={num_processes})")
        if ":" not in str(coordinator_address):
            raise ValueError(f"--coordinator_address={coordinator_address!r} must be HOST:PORT")
    if _initialized():
        return jax.process_count() > 1
    if coordinator_address is not None:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=coordinator_address,
            num_processes=int(num_processes),
            process_id=int(process_id),
            coordinator_bind_address=loopback_bind_address(coordinator_address),
        )
    else:
        env = cluster_env()
        if env is None:
            return False
        log.info("multi-process environment detected (%s): jax.distributed.initialize()", env)
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_bind_address=loopback_bind_address(os.environ.get("JAX_COORDINATOR_ADDRESS", ""))
        )
    if jax.process_count() > 1 and jax.default_backend() == "cpu":
        # gloo creates its context at the first cross-process collective and gives up when a process is
        # more than 30 s late: create it now, while every process is here, not in the middle of a run.
        barrier("kalm_jax_initialized")
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("kalm_jax_gloo_context")
    log.info(
        "JAX process %d of %d; %d local / %d global devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
    return True


def loopback_bind_address(coordinator_address: str) -> str | None:
    """The coordination service's bind address for `coordinator_address`: the address itself when its host
    is loopback (127.0.0.0/8, ::1, localhost), else None (JAX's default: JAX_COORDINATOR_BIND_ADDRESS, or
    every interface, which the other hosts of a real cluster need)."""
    if os.environ.get("JAX_COORDINATOR_BIND_ADDRESS") or ":" not in coordinator_address:
        return None
    host = coordinator_address.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return coordinator_address
    try:
        return coordinator_address if ipaddress.ip_address(host).is_loopback else None
    except ValueError:  # a host name
        return None


def _initialized() -> bool:
    from jax._src import distributed as _dist  # the runtime's own record of initialize() having run

    return getattr(_dist.global_state, "client", None) is not None


def is_primary() -> bool:
    """True on process 0 (the one that writes shared files: metrics, reports, manifests)."""
    import jax

    return jax.process_index() == 0


_barrier_uses: dict[str, int] = {}


def barrier_timeout() -> float:
    """Seconds a barrier waits: KALM_BARRIER_TIMEOUT, default 3600."""
    raw = os.environ.get(BARRIER_TIMEOUT_ENV, "")
    try:
        value = float(raw) if raw.strip() else DEFAULT_BARRIER_TIMEOUT
    except ValueError:
        raise ValueError(f"{BARRIER_TIMEOUT_ENV}={raw!r} is not a number of seconds") from None
    if not value > 0:
        raise ValueError(f"{BARRIER_TIMEOUT_ENV}={raw!r} must be > 0 seconds")
    return value


def barrier(name: str, timeout: float | None = None) -> None:
    """Blocks until every process reaches the barrier `name` (no-op with one process).

    A host-side wait on JAX's coordination service (no device collective, so no collective deadline),
    for at most `timeout` seconds (default `barrier_timeout()`). Every process must pass the same names
    in the same order; a name may be used again (each use is a barrier of its own).

    Raises:
      BarrierTimeout: some process did not arrive in time (the message names the barrier and them).
    """
    import jax

    if jax.process_count() == 1:
        return
    from jax._src import distributed as _dist

    timeout = barrier_timeout() if timeout is None else float(timeout)
    use = _barrier_uses[name] = _barrier_uses.get(name, 0) + 1
    try:
        _dist.global_state.client.wait_at_barrier(f"kalm_jax:{name}:{use}", max(1, int(timeout * 1000)))
    except Exception as e:  # jax.errors.JaxRuntimeError
        text = str(e)
        if "DEADLINE_EXCEEDED" not in text:  # not a timeout (a peer failed, the service is gone): as it is
            raise
        missing = re.search(r"timed out task names:\s*((?:\d+\s*)+)", text)
        who = f"; not arrived: process {', '.join(missing.group(1).split())}" if missing else ""
        raise BarrierTimeout(
            f"barrier {name!r} (process {jax.process_index()} of {jax.process_count()}) did not complete within "
            f"{timeout:g} s{who} (raise {BARRIER_TIMEOUT_ENV}=SECONDS if that process is still working). "
            f"JAX: {text.splitlines()[0] if text else type(e).__name__}"
        ) from e


def any_process(flag: bool) -> bool:
    """True when `flag` is true on at least one process (a max-reduce; every process must call it)."""
    import jax

    if jax.process_count() == 1:
        return bool(flag)
    import numpy as np
    from jax.experimental import multihost_utils

    return bool(np.max(multihost_utils.process_allgather(np.asarray(int(bool(flag)), np.int32))))


def primary_first(fn: Callable[[], T], name: str) -> T:
    """`fn()` on process 0, then (after barrier `name`) on the others: for steps that create shared files
    the others then read (a cached run file, a store manifest). Every process must call it."""
    import jax

    if jax.process_count() == 1:
        return fn()
    out = fn() if is_primary() else None
    barrier(f"{name}:primary_done")
    if not is_primary():
        out = fn()
    barrier(f"{name}:all_done")
    return out  # type: ignore[return-value]


def allgather_json(obj: Any) -> list[Any]:
    """Every process's JSON-serialisable `obj`, in process order, on every process (a collective)."""
    import jax

    if jax.process_count() == 1:
        return [obj]
    import json

    import numpy as np
    from jax.experimental import multihost_utils

    data = np.frombuffer(json.dumps(obj).encode(), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.asarray(data.size, np.int64))).reshape(-1)
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[: data.size] = data
    rows = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(sizes), -1)
    return [json.loads(rows[i, : int(n)].tobytes().decode()) for i, n in enumerate(sizes)]


__all__ = [
    "initialize",
    "cluster_env",
    "is_primary",
    "barrier",
    "BarrierTimeout",
    "barrier_timeout",
    "any_process",
    "primary_first",
    "allgather_json",
]
