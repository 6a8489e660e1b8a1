"""Evaluation sweeps: datasets × checkpoints × instructions × MEP ratios, resumable, with reports.

  python eval.py --config=configs/eval.py --config.checkpoint=CKPT --config.data_dir=DATA \
      --config.datasets=scifact,trec-dl-2019-passage --config.ratios=1,4,8 --config.output_dir=OUT

Without a checkpoint only the first stage is evaluated. Rerunning the same command resumes: finished cells
in OUT/results.jsonl are kept and skipped. See docs/evaluation.md.
"""

from pathlib import Path

from absl import app, flags, logging
from ml_collections import config_flags

from kalm_jax import distributed

config_flags.DEFINE_config_file("config", str(Path(__file__).resolve().parent / "configs" / "eval.py"), "Evaluation sweep configuration.", lock_config=True)
distributed.define_flags()
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    distributed.initialize_from(FLAGS)
    from kalm_jax.evaluation import sweep

    rows = sweep.run_sweep(FLAGS.config)
    logging.info("%d results in %s/%s", len(rows), FLAGS.config.output_dir, sweep.RESULTS)
    print(f"{len(rows)} results in {FLAGS.config.output_dir}/{sweep.RESULTS}; summary in "
          f"{FLAGS.config.output_dir}/summary.md")


if __name__ == "__main__":
    app.run(main)
