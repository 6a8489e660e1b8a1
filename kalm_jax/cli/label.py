"""`kalm-label`: score training pairs with a teacher checkpoint, on every process (`kalm_jax.training.label`)."""

from __future__ import annotations

import sys

from kalm_jax import cli
from kalm_jax.parallel import distributed
from kalm_jax.training.label import label


def run(config, coordinator_address=None, num_processes=None, process_id=None) -> int:
    """The CLI: settings from configs/label.py and `--config.KEY=VALUE` overrides (`kalm_jax.cli`)."""
    for key in ("teacher", "input", "output"):
        if not config[key]:
            raise cli.ConfigError(f"--config.{key} is required")
    distributed.initialize(coordinator_address, num_processes, process_id)
    n = label(
        config.teacher,
        config.input,
        config.output,
        tokenizer=config.tokenizer or None,
        ratio=config.ratio,
        fmt=config.format,
        max_document_tokens=config.max_document_tokens,
        max_query_tokens=config.max_query_tokens,
        batch_size=config.batch_size,
        dtype=config.dtype or None,
        quantization=config.quantization or None,
        device_states=config.device_states,
        shard_size=config.shard_size,
    )
    if distributed.is_primary():
        print(f"labelled {n} examples -> {config.output}")
    return 0


def main(argv=None) -> int:
    """The command line (`kalm-label`, `python -m kalm_jax.cli.label`); returns the exit status."""
    return cli.run(run, "label.py", argv=argv, flags=cli.DISTRIBUTED_FLAGS, errors=(FileNotFoundError, ValueError))


if __name__ == "__main__":
    sys.exit(main())
