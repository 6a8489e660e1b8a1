"""`kalm-bench --config.shapes=tiny,nano --config.out=FILE.json`: benchmark tables + JSON rows (`kalm_jax.perf.bench`).

Rows: kind in {encode, score, online_ratio, peer, train}, with shape, n, r where they apply and the
measured figures. Runs on whatever backend JAX has; the PyTorch peer runs when torch + CUDA exist (or
with --config.peer_on_cpu=true). Settings: the bench.py config [:grid|h100|side_by_side|quantized]. See
docs/performance.md for the row fields and the FLOP model.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def main(argv=None) -> int:
    """The CLI (`kalm_jax.cli`): settings of configs/bench.py[:suite] plus `--config.KEY=VALUE` overrides."""
    from kalm_jax import cli

    return cli.run(run_bench, "bench.py", argv=argv)


def run_bench(config) -> int:
    """Runs the suite `config.suite` and prints its tables; rows to `config.out`, markdown to `config.markdown`."""
    import dataclasses

    from kalm_jax import cli
    from kalm_jax.model.config import PRESETS
    from kalm_jax.perf.bench import report, runner, suite

    unknown = [s for s in config.shapes if s not in PRESETS]
    if unknown:
        raise cli.ConfigError(f"unknown shapes {unknown}; valid: {sorted(PRESETS)}")
    if config.peer not in ("auto", "on", "off"):
        raise cli.ConfigError(f"--config.peer must be auto, on or off, got {config.peer!r}")
    for name in ("candidates", "prompt_len", "encode_tokens", "score_batch", "repeats", "rotations", "rounds"):
        if config[name] < 1:
            raise cli.ConfigError(f"--config.{name} must be >= 1, got {config[name]}")
    if config.warmup < 0:
        raise cli.ConfigError(f"--config.warmup must be >= 0, got {config.warmup}")
    if any(int(x) < 1 for x in (*config.encode_lengths, *config.score_lengths, *config.ratios)):
        raise cli.ConfigError("encode_lengths, score_lengths and ratios must be positive integers")
    # Let PyTorch (the peer runs first) and JAX share the device: JAX allocates on demand.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    out = Path(config.out) if config.out else None
    markdown = Path(config.markdown) if config.markdown else None
    from kalm_jax.model.quantization import MODES

    modes = [m.strip() for m in str(config.quantization).split(",") if m.strip()]
    if not modes or any(m not in MODES for m in modes):
        raise cli.ConfigError(f"--config.quantization={config.quantization!r}: expected one or more of {MODES}")
    if config.suite == "quantized":
        return _quantized(config, modes, out, markdown)
    if len(modes) > 1:
        raise cli.ConfigError(f"--config.quantization: one mode for the {config.suite} suite (several: quantized)")
    if config.suite in ("side_by_side", "side_by_side_check"):
        if modes != ["none"]:
            raise cli.ConfigError("side_by_side compares float weights with the peer: --config.quantization=none")
        return _side_by_side(config, out, markdown)
    from tqdm import tqdm

    fields = {f.name for f in dataclasses.fields(suite.BenchSettings)}
    settings = suite.BenchSettings(
        **{k: (tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in config.items() if k in fields}
    )
    peer = {"auto": None, "on": True, "off": False}[config.peer]
    peak = tuple(int(x) for x in config.peak_sizes if int(x) > 0) or None
    bar = tqdm(desc="bench", unit="row", file=sys.stderr)
    rows = runner.run(
        settings,
        peer=peer,
        peer_on_cpu=config.peer_on_cpu,
        out=out,
        peak_sizes=peak,
        progress=bar.set_postfix_str,
        on_row=lambda _: bar.update(),
    )
    bar.close()
    report.print_tables(rows)
    if markdown:
        markdown.write_text(report.markdown(rows))
    if out:
        print(f"wrote {len(rows)} rows to {out}")
    failed = [r for r in rows if str(r.get("skipped", "")).startswith("failed:")]
    if failed:
        print(f"{len(failed)} cells failed (rows with 'skipped: failed: ...'; tracebacks above)", file=sys.stderr)
        return 1
    return 0


def _round_settings(config) -> dict:
    """The settings of the interleaved-round suites (side_by_side, quantized): one (n, r) and the round counts."""
    return {
        "n": config.score_lengths[0],
        "r": config.ratios[0],
        "candidates": config.candidates,
        "prompt_len": config.prompt_len,
        "dtype": config.dtype,
        "rounds": config.rounds,
        "repeats": config.repeats,
        "warmup": config.warmup,
        "seed": config.seed,
    }


def _emit(rows: list[dict], out: Path | None, markdown: Path | None) -> None:
    """The interleaved-round suites' output: the tables on stdout, the rows to `out` (JSON lines) and the
    Markdown tables to `markdown` when given."""
    from kalm_jax.perf.bench import report, runner

    report.print_tables(rows)
    if out:
        runner.write_rows(rows, out)
        print(f"wrote {len(rows)} rows to {out}")
    if markdown:
        markdown.write_text(report.markdown(rows))


def _quantized(config, modes: list[str], out: Path | None, markdown: Path | None) -> int:
    """quantized: every mode beside the float model in interleaved rounds (`kalm_jax.perf.bench.quantized`)."""
    from kalm_jax.perf.bench import quantized

    rows = quantized.run(
        config.shapes[0],
        modes=modes,
        **_round_settings(config),
        progress=lambda m: print(m, file=sys.stderr),
    )
    _emit(rows, out, markdown)
    return 0


def _side_by_side(config, out: Path | None, markdown: Path | None) -> int:
    """side_by_side (and side_by_side_check: also the array-level path, then the minimums: exit 1 and one
    line on stderr when a row's median speedup is below its minimum)."""
    from kalm_jax.perf.bench import side_by_side

    checking = config.suite == "side_by_side_check"
    rows = side_by_side.run(
        config.shapes[0],
        **_round_settings(config),
        array_level=checking,
        progress=lambda m: print(m, file=sys.stderr),
    )
    _emit(rows, out, markdown)
    note = side_by_side.host_note(rows)
    if note:
        print(note, file=sys.stderr)
    if checking:
        minimum = {"encode": config.min_encode_speedup, "score": config.min_score_speedup}
        failures = side_by_side.check(rows, minimum)
        if failures:
            print(f"side-by-side check FAILED: {'; '.join(failures)}", file=sys.stderr)
            return 1
        print(
            f"side-by-side check passed: every path at least {minimum['encode']:g}x (encode) and "
            f"{minimum['score']:g}x (score) the peer"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
