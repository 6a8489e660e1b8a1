"""Detecting a multi-process job: a single host description (what kalm-jax gives libtpu on a machine without a
TPU) is one process; several listed TPU hosts are a cluster."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from kalm_jax.parallel import distributed

REPO = Path(__file__).resolve().parents[2]
CLUSTER_KEYS = ("JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE", "TPU_PROCESS_ADDRESSES")


@pytest.mark.parametrize(
    "hosts,expected", [("localhost", None), ("10.0.0.1", None), (" a , ", None), ("10.0.0.1,10.0.0.2", "tpu")]
)
def test_tpu_worker_hostnames_name_a_cluster_only_with_several_hosts(monkeypatch, hosts, expected):
    for key in CLUSTER_KEYS:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", hosts)
    assert distributed.cluster_env() == expected


def test_a_machine_with_libtpu_and_no_tpu_runs_one_process():
    """The README's train command on a host with the test extras (libtpu, no TPU chip) and no JAX_PLATFORMS:
    the local description given to libtpu must not start the distributed runtime (it failed with
    "coordinator_address should be defined")."""
    try:
        import libtpu  # noqa: F401
    except ImportError:
        pytest.fail("needs the libtpu wheel: pip install -e '.[test]'")
    env = {k: v for k, v in os.environ.items() if k not in CLUSTER_KEYS and not k.startswith(("JAX_", "TPU_"))}
    env["PYTHONPATH"] = str(REPO)
    code = (
        "import kalm_jax, os; from kalm_jax.parallel import distributed; "
        "print(os.environ.get('TPU_WORKER_HOSTNAMES'), distributed.cluster_env(), distributed.initialize())"
    )
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split()[-2:] == ["None", "False"], r.stdout
