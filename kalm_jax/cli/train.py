"""`kalm-train` / `python train.py`: train a KaLM reranker.

    kalm-train --config=train.py:tiny --workdir=DIR [--config.KEY=VALUE ...]

Resumes from DIR when it holds checkpoints (docs/training.md). Multi-process: the same command on every host
(auto-detected on TPU pods / SLURM), or `--coordinator_address=H:P --num_processes=N --process_id=I`, or
`kalm-launch -n N -- train.py ...` on one machine (docs/multihost.md).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

from kalm_jax import cli


def run(config, workdir=None, coordinator_address=None, num_processes=None, process_id=None) -> int:
    """Trains with `config` in `workdir` (the CLI's body, after parsing)."""
    if not workdir:
        raise cli.ConfigError("--workdir=DIR is required (checkpoints, metrics.jsonl, tensorboard, tokenizer)")
    cli.setup_logging()
    from kalm_jax.training.config import validate

    validate(config)  # every value checked before the runtime starts and minutes of data preparation
    from kalm_jax.parallel import distributed

    distributed.initialize(coordinator_address, num_processes, process_id)
    import jax

    from kalm_jax.training.loop import train_and_evaluate

    logging.info("JAX process %d/%d, %d devices", jax.process_index(), jax.process_count(), jax.device_count())
    train_and_evaluate(config, workdir)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns the exit status."""
    return cli.run(
        run,
        "train.py:tiny",
        argv=argv,
        flags=(cli.Flag("workdir", None, "run directory"), *cli.DISTRIBUTED_FLAGS),
        errors=user_errors,
    )


def user_errors() -> tuple[type[BaseException], ...]:
    """The errors reported in one line (imported after parsing: the training modules need the train extra)."""
    from kalm_jax.atomic import DiskFullError
    from kalm_jax.checkpoints.integrity import IntegrityError
    from kalm_jax.checkpoints.orbax_io import CheckpointError
    from kalm_jax.locks import DirectoryLocked
    from kalm_jax.parallel.distributed import BarrierTimeout
    from kalm_jax.text.spm import TokenizerError
    from kalm_jax.training.checkpoints import CorruptCheckpoint, SettingsMismatch

    return (
        FileNotFoundError,
        SettingsMismatch,
        CorruptCheckpoint,
        CheckpointError,
        IntegrityError,
        TokenizerError,
        DirectoryLocked,
        DiskFullError,
        BarrierTimeout,
    )


if __name__ == "__main__":
    sys.exit(main())
