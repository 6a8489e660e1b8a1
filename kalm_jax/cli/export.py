"""`kalm-export`: a training checkpoint -> a standalone model directory (`kalm_jax.training.export`)."""

from __future__ import annotations

import sys

from kalm_jax import cli
from kalm_jax.training.export import export


def main(argv: list[str] | None = None) -> int:
    """The CLI (`kalm_jax.cli`): SOURCE OUTPUT positional, settings of configs/export.py as `--config.KEY=VALUE`."""

    def run(config) -> int:
        if not config.source or not config.output:
            raise cli.ConfigError(
                "usage: kalm-export SOURCE OUTPUT [--config.keep_lora=true] [--config.quantization=int8]"
            )
        out = export(
            config.source,
            config.output,
            merge_lora=not config.keep_lora,
            overwrite=config.overwrite,
            quantization=config.quantization or None,
        )
        print(out)
        return 0

    return cli.run(
        run,
        "export.py",
        argv=argv,
        positional=("source", "output"),
        errors=(FileNotFoundError, FileExistsError, ValueError),
    )


if __name__ == "__main__":
    sys.exit(main())
