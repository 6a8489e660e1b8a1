"""Evaluation sweeps: datasets × checkpoints × instructions × MEP ratios, resumable, with reports.

  python eval.py --config.checkpoint=CKPT --config.data_dir=DATA \
      --config.datasets=scifact,trec-dl-2019-passage --config.ratios=1,4,8 --config.output_dir=OUT

Settings: configs/eval.py plus `--config.KEY=VALUE` overrides (`kalm_jax.cli`). Without a checkpoint only the
first stage is evaluated. Rerunning the same command resumes: finished cells in OUT/results.jsonl are kept and
skipped. Multi-process: see docs/multihost.md. See docs/evaluation.md.
"""

import logging
import sys

from kalm_jax import cli


def main(config, coordinator_address=None, num_processes=None, process_id=None) -> int:
    cli.setup_logging()
    from kalm_jax import distributed

    distributed.initialize(coordinator_address, num_processes, process_id)
    from kalm_jax.evaluation import sweep

    rows = sweep.run_sweep(config)
    logging.info("%d results in %s/%s", len(rows), config.output_dir, sweep.RESULTS)
    if distributed.is_primary():
        print(f"{len(rows)} results in {config.output_dir}/{sweep.RESULTS}; summary in {config.output_dir}/summary.md")
    return 0


if __name__ == "__main__":
    from kalm_jax.atomic import DiskFullError
    from kalm_jax.data.textfile import DataError
    from kalm_jax.evaluation.results import OutputDirLocked
    from kalm_jax.evaluation.settings import SweepConfigError
    from kalm_jax.evaluation.store import StaleStoreError, StoreLocked
    from kalm_jax.integrity import IntegrityError
    from kalm_jax.passage_states import PassageStatesError

    # user-facing errors: one line naming the file / setting, exit status 2 (KALM_DEBUG=1: with the traceback)
    sys.exit(cli.run(main, "eval.py", flags=cli.DISTRIBUTED_FLAGS,
                     errors=(SweepConfigError, OutputDirLocked, FileNotFoundError, DataError, StaleStoreError,
                             StoreLocked, PassageStatesError, IntegrityError, DiskFullError)))
