"""`kalm-verify-release`: check a released checkpoint against the PyTorch reference
(`kalm_jax.checkpoints.verify_release`)."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from kalm_jax import cli
from kalm_jax.checkpoints.verify_release import run


def main(argv: Sequence[str] | None = None) -> int:
    """The CLI (`kalm_jax.cli`): PATH positional, settings of configs/verify_release.py as `--config.KEY=VALUE`."""
    return cli.run(run, "verify_release.py", argv=argv, positional=("path",))


if __name__ == "__main__":
    sys.exit(main())
