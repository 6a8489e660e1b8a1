"""Benchmark settings: `kalm-bench [--config=bench.py:<grid|h100|side_by_side|side_by_side_check>]
[--config.KEY=VALUE ...]`.

grid (default): the full grid of `kalm_jax.perf.bench.suite.BenchSettings` (meant for a GPU; shrink it on CPU).
h100: the fixed H100 grid (`suite.H100`: nano and large, n 512/4096, r 1/4/8, 100 candidates, peer rows, no
train rows), written to bench_h100.json + bench_h100.md; any field given with --config.* overrides it.
side_by_side: kalm-jax vs the PyTorch peer on identical weights in interleaved rounds (first `shapes` entry,
first `score_lengths` entry as n, first `ratios` entry as r). The grid's values live in `suite.BenchSettings`.
side_by_side_check: the check run before a change to the model, attention or the engine lands (CONTRIBUTING.md):
side_by_side at nano fp32, n = 512, r = 4, 16 candidates, 3 interleaved rounds, through the engine and the
array-level functions; exits 1 when a median speedup over the peer is below min_encode_speedup /
min_score_speedup.
quantized: quantized weights beside float ones on this host (`kalm_jax.perf.bench.quantized`): the first `shapes`
entry (tiny, float32: what the bench runs on a CPU host), n = 512, r = 4, 16 candidates, the modes of
`quantization` against the float model, 5 interleaved rounds; prints time / float per mode and op.
Every suite takes `quantization`: the weight mode of the engines it times (grid, h100: the one mode, "none" =
the float weights; quantized: a comma-separated list compared with the float model).
"""

import dataclasses

import ml_collections

SUITES = ("grid", "h100", "side_by_side", "side_by_side_check", "quantized")


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
    c.rounds = 5  # interleaved rounds of side_by_side and quantized
    if name == "side_by_side_check":
        c.update(
            shapes=("nano",),
            dtype="float32",
            score_lengths=(512,),
            ratios=(4,),
            candidates=16,
            prompt_len=64,
            warmup=1,
            repeats=2,
            rounds=3,
        )
        c.min_encode_speedup = 1.7  # kalm-jax / peer tokens/s, median over rounds, engine and array-level
        c.min_score_speedup = 5.0  # kalm-jax / peer pairs/s, likewise
    if name == "quantized":
        c.update(
            shapes=("tiny",),
            dtype="float32",
            score_lengths=(512,),
            ratios=(4,),
            candidates=16,
            prompt_len=64,
            warmup=1,
            repeats=3,
            rounds=5,
            quantization="int8,int8-dynamic,fp8",
        )
    return c
