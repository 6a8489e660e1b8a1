"""Shared fixtures: the dataset directory and tiny PyTorch reference checkpoints."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _default_data_dir() -> Path:
    return Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The BEIR-layout datasets: $KALM_DATA_DIR, else ../shared/data beside the repository."""
    path = Path(os.environ.get("KALM_DATA_DIR", _default_data_dir()))
    if not (path / "scifact").is_dir():
        raise RuntimeError(f"dataset directory {path} has no scifact/; set KALM_DATA_DIR")
    return path


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory):
    """A tiny random HF T5Gemma 2 checkpoint (GQA, window 4, linear global RoPE): (dir, torch model)."""
    from torch_reference import build_tiny_hf

    d = tmp_path_factory.mktemp("tiny_hf")
    model = build_tiny_hf(d, heads=4, kv_heads=2, window=4)
    return d, model
