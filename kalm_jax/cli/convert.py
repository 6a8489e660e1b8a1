"""`kalm-convert`: inspect a checkpoint and convert between Hugging Face and the native format
(`kalm_jax.checkpoints.convert`)."""

from __future__ import annotations

import sys

from kalm_jax import cli
from kalm_jax.checkpoints.convert import run


def main(argv: list[str] | None = None) -> int:
    """The CLI (`kalm_jax.cli`): positional COMMAND SOURCE [OUTPUT], settings as `--config.KEY=VALUE`."""

    def guarded(config) -> int:
        try:
            return run(config)
        except (FileNotFoundError, FileExistsError, ValueError, cli.ConfigError):
            raise
        except Exception as e:  # noqa: BLE001 - a CLI prints one line, not a traceback
            first = (str(e).strip().splitlines() or [""])[0][:500]
            raise RuntimeError(f"{type(e).__name__}: {first}") from None

    return cli.run(
        guarded,
        "convert.py",
        argv=argv,
        positional=("command", "source", "output"),
        errors=(FileNotFoundError, FileExistsError, ValueError, RuntimeError),
    )


if __name__ == "__main__":
    sys.exit(main())
