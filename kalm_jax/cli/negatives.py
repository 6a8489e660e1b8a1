"""`kalm-negatives`: mine hard negatives into training JSONL (`kalm_jax.data.negatives`)."""

from __future__ import annotations

import sys

from kalm_jax import cli
from kalm_jax.data.negatives import run_cli


def main(argv: list[str] | None = None) -> int:
    """The CLI (`kalm_jax.cli`): settings of configs/negatives.py as `--config.KEY=VALUE`; returns the exit status."""
    return cli.run(run_cli, "negatives.py", argv=argv, errors=(FileNotFoundError, ValueError))


if __name__ == "__main__":
    sys.exit(main())
