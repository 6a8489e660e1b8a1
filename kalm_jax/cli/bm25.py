"""`kalm-bm25`: BM25 first-stage runs for BEIR datasets (`kalm_jax.data.bm25`)."""

from __future__ import annotations

import sys

from kalm_jax import cli
from kalm_jax.data.bm25 import run_cli


def main(argv: list[str] | None = None) -> int:
    """The CLI (`kalm_jax.cli`): settings of configs/bm25.py as `--config.KEY=VALUE`; returns the exit status."""
    return cli.run(run_cli, "bm25.py", argv=argv, errors=(FileNotFoundError, ValueError))


if __name__ == "__main__":
    sys.exit(main())
