"""`kalm-report`: regenerate summary.md, results.csv and plots of an evaluation output directory
(`kalm_jax.evaluation.report`)."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from kalm_jax.evaluation.report import write_report


def main(argv: Sequence[str] | None = None) -> None:
    import argparse

    p = argparse.ArgumentParser(description="Regenerate summary.md, results.csv and plots from OUT/results.jsonl")
    p.add_argument("output_dir")
    args = p.parse_args(argv)
    paths = write_report(args.output_dir)
    print(f"wrote {paths['summary']}, {paths['csv']} and {len(paths['plots'])} plots")


if __name__ == "__main__":
    sys.exit(main())
