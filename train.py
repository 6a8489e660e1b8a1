"""Train a KaLM reranker: `python train.py --config=configs/train.py:tiny --workdir=DIR [--config.x=y ...]`.

Resumes from DIR when it holds checkpoints. See docs/training.md. Multi-process: the same command on every
host (auto-detected on TPU pods / SLURM), or `--coordinator_address=H:P --num_processes=N --process_id=I`,
or `python -m kalm_jax.launch -n N -- train.py ...` on one machine (docs/multihost.md). Settings come
from one config file plus `--config.KEY=VALUE` overrides (`kalm_jax.cli`, the entry of every CLI).
"""

import logging
import sys

from kalm_jax import cli


def main(config, workdir=None, coordinator_address=None, num_processes=None, process_id=None) -> int:
    if not workdir:
        raise cli.ConfigError("--workdir=DIR is required (checkpoints, metrics.jsonl, tensorboard, tokenizer)")
    cli.setup_logging()
    from kalm_jax.training.config import validate

    validate(config)  # every value checked before the runtime starts and minutes of data preparation
    from kalm_jax import distributed

    distributed.initialize(coordinator_address, num_processes, process_id)
    import jax

    from kalm_jax.training.loop import train_and_evaluate

    logging.info("JAX process %d/%d, %d devices", jax.process_index(), jax.process_count(), jax.device_count())
    train_and_evaluate(config, workdir)
    return 0


if __name__ == "__main__":
    from kalm_jax.atomic import DiskFullError
    from kalm_jax.checkpointing import CheckpointError
    from kalm_jax.integrity import IntegrityError
    from kalm_jax.locks import DirectoryLocked
    from kalm_jax.tokenizer import TokenizerError
    from kalm_jax.training.checkpoints import CorruptCheckpoint, SettingsMismatch

    sys.exit(cli.run(main, "train.py:tiny", flags=(cli.Flag("workdir", None, "run directory"), *cli.DISTRIBUTED_FLAGS),
                     errors=(FileNotFoundError, SettingsMismatch, CorruptCheckpoint, CheckpointError, IntegrityError,
                             TokenizerError, DirectoryLocked, DiskFullError)))
