"""kalm-compare: two eval output directories compared cell by cell, against scipy's rank correlations and
hand-computed values on tiny synthetic run files."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import stats

from kalm_jax.cli import compare as compare_cli
from kalm_jax.data.trec import write_run
from kalm_jax.evaluation import compare

# q1 swaps its last two documents, q2 keeps its order (z is only in OTHER): hand-computed below.
BASE = {"q1": {"a": 3.0, "b": 2.0, "c": 1.0}, "q2": {"x": 1.0, "y": 2.0}}
OTHER = {"q1": {"a": 3.0, "b": 1.0, "c": 2.0}, "q2": {"x": 1.5, "y": 2.0, "z": 5.0}}
SPREAD = math.sqrt(0.56)  # std of the common base margins [3, 2, 1, 1, 2]: mean 1.8, squares sum 2.8 / 5


@pytest.mark.parametrize("seed", range(6))
def test_rank_correlations_equal_scipy(seed):
    """Kendall tau-b and Spearman rho (average ranks) equal scipy's on vectors with many ties."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 60))
    x = rng.integers(0, 6, n).astype(float)  # few values: ties in both
    y = x + rng.integers(-2, 3, n)
    assert compare.kendall_tau_b(x, y) == pytest.approx(stats.kendalltau(x, y).statistic, abs=1e-12)
    assert compare.spearman_rho(x, y) == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)
    np.testing.assert_array_equal(compare.average_ranks(x), stats.rankdata(x))


def test_rank_correlations_undefined_are_nan():
    """A constant vector or fewer than two documents has no rank correlation (NaN, as in scipy)."""
    for x, y in (([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]), ([1.0], [2.0]), ([], [])):
        assert math.isnan(compare.kendall_tau_b(x, y)) and math.isnan(compare.spearman_rho(x, y))


def test_compare_runs_hand_computed():
    """q1: pairs (a,b), (a,c) concordant, (b,c) discordant -> tau 1/3; rank differences 0, 1, 1 -> rho
    1 - 6*2/(3*8) = 0.5. q2: tau = rho = 1 over its common x, y. |delta| 0, 1, 1, 0.5, 0 -> max 1, mean 0.5."""
    r = compare.compare_runs(BASE, OTHER)
    assert r["per_query"]["q1"]["kendall"] == pytest.approx(1 / 3)
    assert r["per_query"]["q1"]["spearman"] == pytest.approx(0.5)
    assert r["per_query"]["q2"] == {"kendall": 1.0, "spearman": 1.0, "overlap": 1.0, "n": 2}
    assert (r["kendall_mean"], r["kendall_min"]) == (pytest.approx(2 / 3), pytest.approx(1 / 3))
    assert (r["spearman_mean"], r["spearman_min"]) == (pytest.approx(0.75), pytest.approx(0.5))
    assert (r["pairs"], r["only_base"], r["only_other"], r["queries"]) == (5, 0, 1, 2)
    assert r["margin_spread"] == pytest.approx(SPREAD)
    assert (r["max_abs_delta"], r["mean_abs_delta"]) == (pytest.approx(1.0), pytest.approx(0.5))
    assert r["max_rel_delta"] == pytest.approx(1.0 / SPREAD) and r["mean_rel_delta"] == pytest.approx(0.5 / SPREAD)
    # signed mean (0 - 1 + 1 + 0.5 + 0) / 5; centred on each query's mean delta (q1: 0, q2: 0.25): 0, 1, 1, 0.25, 0.25
    assert r["mean_rel_shift"] == pytest.approx(0.1 / SPREAD)
    assert r["max_rel_centred_delta"] == pytest.approx(1.0 / SPREAD)
    assert r["mean_rel_centred_delta"] == pytest.approx(0.5 / SPREAD)
    assert (r["overlap_mean"], r["overlap_min"]) == (1.0, 1.0)  # every list is shorter than 10
    top2 = compare.compare_runs(BASE, OTHER, k=2)  # q1: {a, b} vs {a, c}; q2: {x, y} of the common x, y
    assert (top2["overlap_mean"], top2["overlap_min"]) == (0.75, 0.5)
    assert [top2["per_query"][q]["overlap"] for q in ("q1", "q2")] == [0.5, 1.0]
    same = compare.compare_runs(BASE, BASE)
    assert (same["kendall_min"], same["spearman_min"], same["max_abs_delta"]) == (1.0, 1.0, 0.0)


def test_top_k_breaks_ties_like_trec_eval():
    """Equal scores: trec_eval ranks the larger doc id first (`metrics.cut`), so the top 1 of a tie is "b"."""
    assert compare.top_k({"a": 1.0, "b": 1.0, "c": 0.0}, 1) == {"b"}
    assert compare.top_k({"a": 1.0, "b": 1.0, "c": 0.0}, 5) == {"a", "b", "c"}


def _eval_dir(path, run, ndcg, checkpoint, quantization=None, ratios=(4,)):
    """A minimal eval output directory: sweep_config.json, results.jsonl rows and their run files."""
    path.mkdir(parents=True)
    ident = {"dtype": "float32", **({"quantization": quantization} if quantization else {})}
    (path / "sweep_config.json").write_text(json.dumps({"identity": ident}))
    rows = [{"dataset": "scifact", "split": "test", "stage": "first_stage", "metrics": {"ndcg_cut_10": 0.3}}]
    for ratio in ratios:
        run_file = f"runs/scifact/ck.default.r{ratio}.trec.gz"
        write_run(run, path / run_file)
        rows.append(
            {
                "dataset": "scifact",
                "split": "test",
                "stage": "rerank",
                "checkpoint": checkpoint,
                "ratio": ratio,
                "instruction": "default",
                "metrics": {"ndcg_cut_10": ndcg},
                "queries": 2,
                "run_file": run_file,
            }
        )
    (path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_kalm_compare_prints_the_table(tmp_path, capsys):
    """`kalm-compare BASE OTHER` matches the rerank cells (one checkpoint each, paths may differ: a float
    checkpoint and its exported int8 one), prints one table line per cell with the values of
    `test_compare_runs_hand_computed`, and writes the table and the rows as JSON with --config.output."""
    base = _eval_dir(tmp_path / "float", BASE, 0.5, "/ck/float", ratios=(1, 4))
    other = _eval_dir(tmp_path / "int8", OTHER, 0.49, "/ck/int8-export", quantization="int8", ratios=(4, 16))
    out = tmp_path / "cmp" / "table.md"
    assert compare_cli.main([str(base), str(other), f"--config.output={out}"]) == 0
    printed = capsys.readouterr().out
    lines = [ln for ln in printed.splitlines() if ln.startswith("| scifact")]
    assert lines == [
        "| scifact | 4 | 2 | 0.5000 | 0.4900 | -0.0100 | 0.6667 | 0.3333 | 0.7500 | 0.5000 | 1.000 | 1.000 | "
        f"{1 / SPREAD:.4f} | {0.5 / SPREAD:.4f} | {SPREAD:.3f} |"
    ], printed
    assert "nDCG@10 as loaded (float32) | nDCG@10 int8 (float32)" in printed
    header = next(ln for ln in printed.splitlines() if ln.startswith("| dataset"))
    cells = [c for c in header.replace("\\|", "").split("|") if c.strip()]  # a markdown table: one | per column
    assert len(cells) == len(lines[0].strip("|").split("|")) == 15, header
    assert "Candidate lists differ in scifact r=4 (0 / 1 pairs)" in printed
    assert out.read_text() == printed
    (row,) = json.loads(out.with_suffix(".json").read_text())
    assert row["ndcg_delta"] == pytest.approx(-0.01) and row["kendall_min"] == pytest.approx(1 / 3)


def test_kalm_compare_bad_input_is_one_line(tmp_path, capsys):
    """No shared cell, a missing run file or a directory without rerank rows: exit 2 with one line."""
    base = _eval_dir(tmp_path / "a", BASE, 0.5, "/ck", ratios=(1,))
    other = _eval_dir(tmp_path / "b", OTHER, 0.5, "/ck", ratios=(4,))
    empty = tmp_path / "empty"
    empty.mkdir()
    gone = _eval_dir(tmp_path / "c", OTHER, 0.5, "/ck", ratios=(1,))
    (gone / "runs/scifact/ck.default.r1.trec.gz").unlink()
    for args, needle in (
        ([base, other], "share no rerank cell"),
        ([base, gone], "ck.default.r1.trec.gz: the run file of scifact r=1 is missing"),
        ([base, empty], "no rerank rows"),
        ([base], "BASE and OTHER are required"),
    ):
        assert compare_cli.main([str(a) for a in args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], err
