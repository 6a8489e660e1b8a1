"""Benchmark settings: `python -m kalm_jax.perf.bench [--config=bench.py:<grid|h100|side_by_side>]
[--config.KEY=VALUE ...]`.

grid (default): the full grid of `kalm_jax.perf.bench.suite.BenchSettings` (meant for a GPU; shrink it on CPU).
h100: the fixed H100 grid (`suite.H100`: nano and large, n 512/4096, r 1/4/8, 100 candidates, peer rows, no
train rows), written to bench_h100.json + bench_h100.md; any field given with --config.* overrides it.
side_by_side: kalm-jax vs the PyTorch peer on identical weights in interleaved rounds (first `shapes` entry,
first `score_lengths` entry as n, first `ratios` entry as r). The grid's values live in `suite.BenchSettings`.
"""

import dataclasses

import ml_collections

SUITES = ("grid", "h100", "side_by_side")


def get_config(arg: str = "grid") -> ml_collections.ConfigDict:
    from kalm_jax.perf.bench import suite

    name = (arg or "grid").strip()
    if name not in SUITES:
        raise ValueError(f"unknown benchmark suite {name!r}; valid: {SUITES}")
    settings = suite.H100 if name == "h100" else suite.BenchSettings()
    c = ml_collections.ConfigDict(dataclasses.asdict(settings))
    c.suite = name
    c.peer = "auto"  # PyTorch peer rows: auto (when torch + CUDA exist), on, off
    c.peer_on_cpu = False  # run the peer on CPU when there is no CUDA
    c.peak_sizes = (0,)  # square matmul sizes for the peak measurement; (0,) = the runner's default
    c.out = "bench_h100.json" if name == "h100" else ""  # JSON file for the rows (rewritten after every row)
    c.markdown = "bench_h100.md" if name == "h100" else ""  # also write the tables as markdown here
    c.rounds = 5  # interleaved rounds of side_by_side
    return c
