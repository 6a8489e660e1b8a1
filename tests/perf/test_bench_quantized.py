"""bench.py:quantized: quantized engines beside the float one in interleaved rounds (tiny, a few tokens: fast)."""

from __future__ import annotations

import json
import statistics

import numpy as np
import pytest

from kalm_jax import cli
from kalm_jax.cli.bench import main


def test_quantized_suite_times_every_mode_against_float(tmp_path, capsys):
    """One row per (mode, op); every mode is timed in every round, and the ratio is the median of the per-round
    ratios to the float engine's time in the same round (float: exactly 1). The quantized engines really run
    quantized weights: their margins differ from the float engine's on the same pairs (float: 0), by little."""
    out = tmp_path / "q.json"
    rc = main(
        [
            "--config=bench.py:quantized",
            "--config.quantization=int8-dynamic",
            "--config.score_lengths=32",
            "--config.candidates=2",
            "--config.prompt_len=12",
            "--config.rounds=2",
            "--config.repeats=1",
            f"--config.out={out}",
        ]
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert "time / float" in text and "int8-dynamic" in text
    rows = {(r["quantization"], r["op"]): r for r in json.loads(out.read_text())}
    assert sorted(rows) == sorted((m, op) for m in ("none", "int8-dynamic") for op in ("encode", "score"))
    for (mode, op), row in rows.items():
        assert row["kind"] == "quantized" and row["shape"] == "tiny" and row["n"] == 32 and row["r"] == 4
        assert len(row["round_s"]) == 2 and all(t > 0 for t in row["round_s"])
        base = rows[("none", op)]["round_s"]
        assert row["ratio"] == pytest.approx(statistics.median(t / f for t, f in zip(row["round_s"], base)))
        assert row["ratio_min"] <= row["ratio"] <= row["ratio_max"]
        if op == "score":
            diff = row["max_abs_margin_diff"]
            assert (diff == 0.0) if mode == "none" else (0.0 < diff < 1.0), (mode, diff)
    assert rows[("none", "encode")]["ratio"] == 1.0
    assert rows[("none", "encode")]["tokens_per_s"] == pytest.approx(2 * 32 / rows[("none", "encode")]["median_s"])
    assert np.isfinite([r["ratio"] for r in rows.values()]).all()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--config=bench.py:quantized", "--config.quantization=int4"], "expected one or more of"),
        (["--config=bench.py:grid", "--config.quantization=int8,fp8"], "one mode for the grid suite"),
        (["--config=bench.py:side_by_side", "--config.quantization=int8"], "compares float weights"),
    ],
)
def test_quantization_setting_is_checked(args, message):
    """A mode that does not exist, several modes for a one-mode suite, or quantized weights beside the float
    PyTorch peer: a config error naming what is valid, before anything is built."""
    with pytest.raises(cli.ConfigError, match=message):
        from kalm_jax.cli.bench import run_bench

        config, _ = cli.parse(args, "bench.py")
        run_bench(config)
