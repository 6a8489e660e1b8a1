"""`kalm-eval` / `python eval.py`: evaluation sweeps (datasets x checkpoints x instructions x MEP ratios).

    kalm-eval --config.checkpoint=CKPT --config.data_dir=DATA \
        --config.datasets=scifact,trec-dl-2019-passage --config.ratios=1,4,8 --config.output_dir=OUT

Settings: the package's eval.py config plus `--config.KEY=VALUE` overrides. Without a checkpoint only the first
stage is evaluated. Rerunning the same command resumes: finished cells in OUT/results.jsonl are kept and skipped.
Multi-process: docs/multihost.md. See docs/evaluation.md.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

from kalm_jax import cli


def run(config, coordinator_address=None, num_processes=None, process_id=None) -> int:
    """Runs the sweep `config` (the CLI's body, after parsing)."""
    cli.setup_logging()
    from kalm_jax.parallel import distributed

    distributed.initialize(coordinator_address, num_processes, process_id)
    from kalm_jax.evaluation import sweep

    rows = sweep.run_sweep(config)
    logging.info("%d results in %s/%s", len(rows), config.output_dir, sweep.RESULTS)
    if distributed.is_primary():
        print(f"{len(rows)} results in {config.output_dir}/{sweep.RESULTS}; summary in {config.output_dir}/summary.md")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns the exit status."""
    return cli.run(run, "eval.py", argv=argv, flags=cli.DISTRIBUTED_FLAGS, errors=user_errors)


def user_errors() -> tuple[type[BaseException], ...]:
    """The errors reported in one line (imported after parsing: the sweep's modules need the eval extra)."""
    from kalm_jax.atomic import DiskFullError
    from kalm_jax.checkpoints.integrity import IntegrityError
    from kalm_jax.data.textfile import DataError
    from kalm_jax.evaluation.results import OutputDirLocked
    from kalm_jax.evaluation.settings import SweepConfigError
    from kalm_jax.evaluation.store import StaleStoreError, StoreLocked
    from kalm_jax.inference.states import PassageStatesError
    from kalm_jax.parallel.distributed import BarrierTimeout

    return (
        SweepConfigError,
        OutputDirLocked,
        FileNotFoundError,
        DataError,
        StaleStoreError,
        StoreLocked,
        PassageStatesError,
        IntegrityError,
        DiskFullError,
        BarrierTimeout,
    )


if __name__ == "__main__":
    sys.exit(main())
