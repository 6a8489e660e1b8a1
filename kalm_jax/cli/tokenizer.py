"""`kalm-tokenizer`: train or inspect a SentencePiece tokenizer (`kalm_jax.text.spm`)."""

from __future__ import annotations

import sys

from kalm_jax import cli
from kalm_jax.text.spm import run_cli


def main(argv: list[str] | None = None) -> int:
    """The CLI (`kalm_jax.cli`): settings of configs/tokenizer.py as `--config.KEY=VALUE`; returns the exit status."""
    return cli.run(run_cli, "tokenizer.py", argv=argv, errors=(FileNotFoundError, ValueError))


if __name__ == "__main__":
    sys.exit(main())
