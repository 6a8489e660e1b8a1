"""`kalm-mteb-bench`: the MTEB adapter against per-pair scoring on the same pairs (`kalm_jax.mteb.bench`)."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from kalm_jax import cli


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns the exit status."""
    from kalm_jax.mteb.bench import run

    return cli.run(run, "mteb_bench.py", argv=argv, errors=(FileNotFoundError,))


if __name__ == "__main__":
    sys.exit(main())
