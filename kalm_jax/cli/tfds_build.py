"""`kalm-tfds-build`: reranker training JSONL -> a TFDS array_record dataset (`kalm_jax.data.tfds_builder`).

Settings: the package's tfds_builder.py config plus `--config.KEY=VALUE` overrides. A command module of its own
because the builder's module needs tensorflow-datasets (the train extra) at import, and ``--help`` must not.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from kalm_jax import cli


def run(config) -> int:
    from kalm_jax.data.tfds_builder import run_cli

    return run_cli(config)


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns the exit status."""
    return cli.run(run, "tfds_builder.py", argv=argv, errors=(FileNotFoundError, ValueError))


if __name__ == "__main__":
    sys.exit(main())
