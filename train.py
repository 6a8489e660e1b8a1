"""Train a KaLM reranker: `python train.py --config=configs/train.py:tiny --workdir=DIR [--config.x=y ...]`.

Resumes from DIR when it holds checkpoints. See docs/training.md. Multi-process: the same command on every
host (auto-detected on TPU pods / SLURM), or `--coordinator_address=H:P --num_processes=N --process_id=I`,
or `python -m kalm_jax.launch -n N -- train.py ...` on one machine (docs/multihost.md).
"""

import os

from absl import app, flags, logging
from ml_collections import config_flags

from kalm_jax import distributed

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "training config file, e.g. configs/train.py:tiny",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "run directory (checkpoints, metrics.jsonl, tensorboard, tokenizer.model)")
distributed.define_flags()
flags.mark_flags_as_required(["config", "workdir"])


class _QuietLibraries:
    """Drops INFO records of Orbax and Grain (they log every file operation)."""

    def filter(self, record):
        path = record.pathname.replace("\\", "/")
        return record.levelno > 20 or not ("/orbax/" in path or "/grain/" in path)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    import logging as std_logging

    import jax

    for handler in std_logging.getLogger().handlers:
        handler.addFilter(_QuietLibraries())

    distributed.initialize_from(FLAGS)
    from kalm_jax.training.loop import train_and_evaluate

    logging.info("JAX process %d/%d, %d devices", jax.process_index(), jax.process_count(), jax.device_count())
    train_and_evaluate(FLAGS.config, FLAGS.workdir)


def check_overrides(argv: list[str]) -> None:
    """Exits with the valid keys when a `--config.a.b=...` override names a key the config lacks
    (before absl parses the flags and ml_collections raises a bare KeyError)."""
    import importlib.util
    import sys

    spec_arg = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    overrides = [a[len("--config."):].split("=", 1)[0] for a in argv if a.startswith("--config.")]
    if spec_arg is None or not overrides:
        return
    path, _, arg = spec_arg.partition(":")
    spec = importlib.util.spec_from_file_location("_train_config", path)
    if spec is None or not os.path.isfile(path):
        sys.exit(f"--config: no such config file {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(arg) if arg else module.get_config()
    for key in overrides:
        node, parts = config, key.split(".")
        for i, part in enumerate(parts):
            if not hasattr(node, "keys") or part not in node:
                section = ".".join(parts[:i]) or "<top level>"
                valid = sorted(node.keys()) if hasattr(node, "keys") else []
                sys.exit(f"unknown config key --config.{key}: {section} has no {part!r}; valid keys there: {valid}")
            node = node[part]


if __name__ == "__main__":
    import sys

    check_overrides(sys.argv[1:])
    app.run(main)
