"""What the multi-process tests share: the environment of a child JAX process, the launcher command, and a small
scifact training file (tests/integration/test_multihost_*.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from child_process import child_env

REPO = Path(__file__).resolve().parents[2]


__all__ = ["child_env", "launcher"]  # child_env: tests/child_process.py


def launcher(args: list[str], *, processes: int = 2, devices: int = 4, grace: float = 3) -> list[str]:
    """`kalm-launch -n processes --devices_per_process devices --grace grace -- ARGS` as a command line."""
    return [
        sys.executable,
        "-m",
        "kalm_jax.cli.launch",
        "-n",
        str(processes),
        "--devices_per_process",
        str(devices),
        "--grace",
        str(grace),
        "--",
        *args,
    ]


def write_scifact_training(data_dir: Path, path: Path, *, queries: int = 40, seed: int = 0) -> Path:
    """The first `queries` scifact training queries, each with its judged passage and 3 random negatives, as
    training JSONL at `path`."""
    from kalm_jax.data.beir import load_beir, passage_text
    from kalm_jax.data.training_jsonl import TrainingExample, write_training_jsonl

    ds = load_beir(data_dir / "scifact", "train")
    ids = sorted(ds.corpus)
    rng = np.random.default_rng(seed)
    examples = []
    for q in sorted(ds.qrels)[:queries]:
        pos = [d for d, rel in ds.qrels[q].items() if rel > 0 and d in ds.corpus][:1]
        neg = [d for d in rng.choice(ids, 3, replace=False) if d not in ds.qrels[q]]
        examples.append(
            TrainingExample(
                query=ds.queries[q],
                pos=[passage_text(ds.corpus[d]) for d in pos],
                neg=[passage_text(ds.corpus[d]) for d in neg],
            )
        )
    write_training_jsonl(examples, path)
    return path
