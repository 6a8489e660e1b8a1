"""The environment of a process the tests start (one definition for every test that starts one).

The tests compile their CPU programs at LLVM optimisation level 0 (`TEST_XLA_FLAGS`): the same HLO and XLA passes,
unoptimised machine code, which the tests' small programs spend less time compiling than they lose running. Every
process of a test session must compile at the same level: results differ in their last bits between levels, and a
test that compares a fingerprint or a result across processes needs them equal (the persistent compilation cache
keys on XLA_FLAGS, so the levels never share its entries)."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"


def child_env(devices: int | None = None, **extra: str) -> dict[str, str]:
    """os.environ for a child JAX process: this checkout on PYTHONPATH, CPU JAX, XLA_FLAGS = `TEST_XLA_FLAGS` with
    `devices` fake CPU devices if given (else the platform's one; a launcher sets each of its processes' count),
    plus `extra` variables. The session's persistent compilation cache (tests/conftest.py) is inherited."""
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu", **extra)
    count = f" --xla_force_host_platform_device_count={devices}" if devices else ""
    env["XLA_FLAGS"] = TEST_XLA_FLAGS + count
    return env
