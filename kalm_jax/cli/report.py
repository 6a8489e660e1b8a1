"""`kalm-report OUTPUT_DIR`: regenerate summary.md, results.csv and plots of an evaluation output directory from
its results.jsonl (`kalm_jax.evaluation.report`)."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from kalm_jax import cli


def run(config) -> int:
    """Writes the report of `config.output_dir`; returns the exit status."""
    from kalm_jax.evaluation.report import write_report

    if not config.output_dir:
        raise cli.ConfigError("OUTPUT_DIR is required: kalm-report OUTPUT_DIR")
    if not (Path(config.output_dir) / "results.jsonl").is_file():
        raise FileNotFoundError(f"{config.output_dir}: no results.jsonl (is it an eval.py output directory?)")
    paths = write_report(config.output_dir)
    print(f"wrote {paths['summary']}, {paths['csv']} and {len(paths['plots'])} plots")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns the exit status."""
    return cli.run(run, "report.py", argv=argv, positional=("output_dir",), errors=(FileNotFoundError, ValueError))


if __name__ == "__main__":
    sys.exit(main())
