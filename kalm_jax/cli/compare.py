"""`kalm-compare BASE OTHER`: compare two evaluation output directories (e.g. float and int8 weights) cell by cell
and print one markdown table: nDCG@10 of each and the difference, per-query Kendall tau / Spearman rho of the
reranked lists, margin error relative to the margin spread (`kalm_jax.evaluation.compare`)."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

from kalm_jax import atomic, cli


def run(config) -> int:
    """Prints (and with `config.output` writes) the comparison; returns the exit status."""
    from kalm_jax.evaluation import compare

    if not config.base_dir or not config.other_dir:
        raise cli.ConfigError("BASE and OTHER are required: kalm-compare BASE OTHER")
    rows = compare.compare_dirs(config.base_dir, config.other_dir)
    table = compare.compare_markdown(
        rows,
        base_label=config.base_label or compare.describe(config.base_dir),
        other_label=config.other_label or compare.describe(config.other_dir),
    )
    print(table, end="")
    if config.output:
        out = Path(config.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic.write_text(out, table)
        atomic.write_text(out.with_suffix(".json"), json.dumps(rows, indent=1, sort_keys=True))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns the exit status."""
    return cli.run(
        run, "compare.py", argv=argv, positional=("base_dir", "other_dir"), errors=(FileNotFoundError, ValueError)
    )


if __name__ == "__main__":
    sys.exit(main())
