"""Export a trained model: LoRA merged into the base weights, written as a kalm-jax model checkpoint.

CLI: ``python -m kalm_jax.training.export WORKDIR_OR_STEP DIR [--config.keep_lora=true]``
(HF safetensors export of the result: `kalm_jax.hf` / the convert tool.) The run's tokenizer (tokenizer.model
or tokenizer.json) is copied next to the exported checkpoint when it is found.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from kalm_jax import checkpointing, loader


def export(source: str | Path, out_dir: str | Path, *, merge_lora: bool = True, overwrite: bool = False) -> Path:
    """Loads `source` (training workdir, step dir, model checkpoint or HF dir), merges LoRA, saves to `out_dir`."""
    _, model = checkpointing.load_any(source)
    if merge_lora and model.has_lora:
        model.merge_lora()
    out = checkpointing.save_model(model, out_dir, overwrite=overwrite)
    with contextlib.suppress(FileNotFoundError):  # a checkpoint without a tokenizer exports without one
        loader.copy_tokenizer(loader.find_tokenizer(source), out)
    return out


def main(argv: list[str] | None = None) -> int:
    """The CLI (`kalm_jax.cli`): SOURCE OUTPUT positional, settings of configs/export.py as `--config.KEY=VALUE`."""
    from kalm_jax import cli

    def run(config) -> int:
        if not config.source or not config.output:
            raise cli.ConfigError("usage: python -m kalm_jax.training.export SOURCE OUTPUT [--config.keep_lora=true]")
        print(export(config.source, config.output, merge_lora=not config.keep_lora, overwrite=config.overwrite))
        return 0

    return cli.run(
        run,
        "export.py",
        argv=argv,
        positional=("source", "output"),
        errors=(FileNotFoundError, FileExistsError, ValueError),
    )


if __name__ == "__main__":
    import sys

    sys.exit(main())
