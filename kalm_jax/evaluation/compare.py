"""Compare two evaluation output directories cell by cell: quality, per-query rank agreement and margin error.

    rows = compare_dirs("runs/eval-float", "runs/eval-int8")
    print(compare_markdown(rows))

Made for "what does a change of weights cost" questions (quantization, a conversion, another dtype): run
`eval.py` twice with the same data settings into two output directories (e.g. ``--config.quantization=int8``
for the second) and compare them (``kalm-compare BASE OTHER``). For every rerank cell (dataset, split,
instruction, ratio) both directories hold, it reads both results rows (trec_eval nDCG@10) and both run files
(the reranked margins of every query) and reports:

  * nDCG@10 of each side and their difference (other - base);
  * the per-query rank correlation of the two reranked lists over the query's common candidates: Kendall's
    tau-b and Spearman's rho (ties averaged), their mean and minimum over queries;
  * the top-10 overlap: the share of each query's base top 10 that stays in the other's top 10 (mean, minimum);
  * the margin error: max and mean |other - base| over every (query, passage) pair, divided by the spread of
    the base margins (their standard deviation over those pairs), and the spread itself.

Everything is recomputed from the two directories' files, so a comparison can be rerun at any time.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kalm_jax.data.trec import read_run
from kalm_jax.evaluation.metrics import HEADLINE
from kalm_jax.evaluation.results import CONFIG_FILE, read_results

Run = Mapping[str, Mapping[str, float]]
TOP_K = 10
"""The cut of the top-k overlap (nDCG@10's)."""


def kendall_tau_b(x: Sequence[float], y: Sequence[float]) -> float:
    """Kendall's tau-b of two score vectors of equal length n: (concordant - discordant pairs) /
    sqrt(pairs untied in x * pairs untied in y); NaN when n < 2 or either vector is constant."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"kendall_tau_b needs two vectors of one length, got {x.shape} and {y.shape}")
    iu = np.triu_indices(len(x), 1)
    sx = np.sign(x[:, None] - x[None, :])[iu]  # [n (n - 1) / 2] pair orders
    sy = np.sign(y[:, None] - y[None, :])[iu]
    untied = float(np.sum(sx != 0)) * float(np.sum(sy != 0))
    return float(np.sum(sx * sy) / math.sqrt(untied)) if untied else math.nan


def average_ranks(x: Sequence[float]) -> np.ndarray:
    """Ranks 1..n of `x` [n] (ascending), tied values sharing the mean of their ranks."""
    x = np.asarray(x, np.float64)
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x), np.float64)
    sorted_x = x[order]
    start = 0
    for end in range(1, len(x) + 1):
        if end == len(x) or sorted_x[end] != sorted_x[start]:
            ranks[order[start:end]] = (start + end + 1) / 2.0  # mean of ranks start+1 .. end
            start = end
    return ranks


def spearman_rho(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rho: the Pearson correlation of the average ranks; NaN when n < 2 or either is constant."""
    if len(x) != len(y):
        raise ValueError(f"spearman_rho needs two vectors of one length, got {len(x)} and {len(y)}")
    if len(x) < 2:
        return math.nan
    rx, ry = average_ranks(x) - (len(x) + 1) / 2.0, average_ranks(y) - (len(y) + 1) / 2.0
    denom = math.sqrt(float(np.sum(rx * rx)) * float(np.sum(ry * ry)))
    return float(np.sum(rx * ry) / denom) if denom else math.nan


def top_k(docs: Mapping[str, float], k: int) -> set[str]:
    """The `k` best documents of one query's {doc: score} in trec_eval's order (score, then doc id, descending)."""
    return {d for d, _ in sorted(docs.items(), key=lambda kv: (kv[1], kv[0]), reverse=True)[:k]}


def _stats(values: Sequence[float]) -> tuple[float, float, int]:
    """(mean, min, count) of the finite values; NaNs when there are none."""
    v = [x for x in values if not math.isnan(x)]
    return (float(np.mean(v)), float(np.min(v)), len(v)) if v else (math.nan, math.nan, 0)


def compare_runs(base: Run, other: Run, k: int = TOP_K) -> dict[str, Any]:
    """Rank agreement and margin error of two runs {qid: {doc: margin}} over the queries and, per query, the
    documents both hold.

    Returns: per_query {qid: {"kendall", "spearman", "overlap", "n"}}; kendall_mean / kendall_min, spearman_mean /
    spearman_min (over queries with a finite correlation; `correlated_queries` of them); overlap_mean /
    overlap_min (the share of the base top `k` of the common documents that is in the other's top `k`: the
    documents nDCG@k sees); pairs (common (query, doc) pairs); margin_spread (standard deviation of the base
    margins over those pairs); max_abs_delta and mean_abs_delta (|other - base| over those pairs) and both
    divided by the spread (max_rel_delta, mean_rel_delta); mean_rel_shift (the signed mean of other - base over
    the pairs, / spread: a shift moves P(yes), not the ranking) and max_rel_centred_delta / mean_rel_centred_delta
    (|other - base| after subtracting its query's mean of it, / spread: the part that can reorder a query's
    candidates); only_base / only_other (pairs one run lacks: two
    reranks of one candidate list have none).
    """
    per_query: dict[str, dict[str, float]] = {}
    centred: list[np.ndarray] = []  # each pair's other - base minus its query's mean of it
    b_all: list[np.ndarray] = []
    o_all: list[np.ndarray] = []
    only_base = sum(len(docs) for q, docs in base.items() if q not in other)
    only_other = sum(len(docs) for q, docs in other.items() if q not in base)
    for qid, bdocs in base.items():
        odocs = other.get(qid)
        if odocs is None:
            continue
        common = [d for d in bdocs if d in odocs]
        only_base += len(bdocs) - len(common)
        only_other += len(odocs) - len(common)
        b = np.array([bdocs[d] for d in common], np.float64)
        o = np.array([odocs[d] for d in common], np.float64)
        b_all.append(b)
        o_all.append(o)
        if len(common):
            centred.append((o - b) - np.mean(o - b))
        top_b = top_k({d: bdocs[d] for d in common}, k)
        top_o = top_k({d: odocs[d] for d in common}, k)
        per_query[qid] = {
            "kendall": kendall_tau_b(b, o),
            "spearman": spearman_rho(b, o),
            "overlap": len(top_b & top_o) / len(top_b) if top_b else math.nan,
            "n": len(common),
        }
    b = np.concatenate(b_all) if b_all else np.zeros(0)
    o = np.concatenate(o_all) if o_all else np.zeros(0)
    delta = np.abs(o - b)
    shifted = np.abs(np.concatenate(centred)) if centred else np.zeros(0)
    spread = float(np.std(b)) if len(b) else math.nan
    k_mean, k_min, n_corr = _stats([v["kendall"] for v in per_query.values()])
    s_mean, s_min, _ = _stats([v["spearman"] for v in per_query.values()])
    o_mean, o_min, _ = _stats([v["overlap"] for v in per_query.values()])
    max_d = float(delta.max()) if len(delta) else math.nan
    mean_d = float(delta.mean()) if len(delta) else math.nan
    rel = (lambda v: v / spread) if spread else (lambda v: math.nan)
    return {
        "per_query": per_query,
        "queries": len(per_query),
        "correlated_queries": n_corr,
        "kendall_mean": k_mean,
        "kendall_min": k_min,
        "spearman_mean": s_mean,
        "spearman_min": s_min,
        "overlap_mean": o_mean,
        "overlap_min": o_min,
        "pairs": int(len(b)),
        "margin_spread": spread,
        "max_abs_delta": max_d,
        "mean_abs_delta": mean_d,
        "max_rel_delta": rel(max_d),
        "mean_rel_delta": rel(mean_d),
        "mean_rel_shift": rel(float(np.mean(o - b))) if len(b) else math.nan,
        "max_rel_centred_delta": rel(float(shifted.max())) if len(shifted) else math.nan,
        "mean_rel_centred_delta": rel(float(shifted.mean())) if len(shifted) else math.nan,
        "only_base": only_base,
        "only_other": only_other,
    }


def _identity(output_dir: Path) -> dict[str, Any]:
    path = output_dir / CONFIG_FILE
    try:
        return json.loads(path.read_text()).get("identity", {})
    except (OSError, ValueError, AttributeError):
        return {}


def describe(output_dir: str | os.PathLike) -> str:
    """A short label of a directory's weights: its sweep's quantization and dtype (from sweep_config.json)."""
    ident = _identity(Path(output_dir))
    return f"{ident.get('quantization') or 'as loaded'} ({ident.get('dtype', '?')})"


def _cells(output_dir: Path) -> dict[tuple, dict[str, Any]]:
    rows = [r for r in read_results(output_dir) if r.get("stage") == "rerank"]
    if not rows:
        raise FileNotFoundError(f"{output_dir}: no rerank rows in results.jsonl (is it an eval.py output directory?)")
    return {(r["dataset"], r["split"], r.get("instruction"), r["ratio"], r.get("checkpoint")): r for r in rows}


def compare_dirs(base_dir: str | os.PathLike, other_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """One comparison row per rerank cell both directories hold (see the module docstring), sorted by
    dataset, instruction, checkpoint, ratio: the cell keys, ndcg_base / ndcg_other / ndcg_delta and
    `compare_runs` of the two run files (without per_query).

    Cells match on (dataset, split, instruction, ratio) and the checkpoint path; when each directory holds one
    checkpoint (two checkpoints compared, e.g. a float one and an exported quantized one) the paths may differ.

    Raises:
      FileNotFoundError: a directory without rerank rows, or a run file a row names is missing.
      ValueError: the two directories share no cell.
    """
    base_dir, other_dir = Path(base_dir), Path(other_dir)
    base, other = _cells(base_dir), _cells(other_dir)
    if len({k[4] for k in base}) == 1 and len({k[4] for k in other}) == 1:
        base = {k[:4] + (None,): v for k, v in base.items()}
        other = {k[:4] + (None,): v for k, v in other.items()}
    keys = sorted(set(base) & set(other), key=lambda k: (k[0], k[1], str(k[2]), str(k[4]), k[3]))
    if not keys:
        raise ValueError(
            f"{base_dir} and {other_dir} share no rerank cell (dataset, split, instruction, ratio, checkpoint): "
            f"{sorted(base)[:3]} vs {sorted(other)[:3]}"
        )
    out = []
    for key in keys:
        b, o = base[key], other[key]
        runs = []
        for d, r in ((base_dir, b), (other_dir, o)):
            path = d / r["run_file"]
            if not path.is_file():
                raise FileNotFoundError(f"{path}: the run file of {key[0]} r={key[3]} is missing")
            runs.append(read_run(path))
        stats = compare_runs(*runs)
        stats.pop("per_query")
        nb, no = b["metrics"].get(HEADLINE), o["metrics"].get(HEADLINE)
        out.append(
            {
                "dataset": key[0],
                "split": key[1],
                "instruction": key[2],
                "ratio": key[3],
                "checkpoint": b.get("checkpoint") if key[4] is not None else None,
                "judged_queries": b.get("queries"),
                "ndcg_base": nb,
                "ndcg_other": no,
                "ndcg_delta": None if nb is None or no is None else no - nb,
                **stats,
            }
        )
    return out


def _f(v: Any, digits: int = 4, sign: bool = False) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:+.{digits}f}" if sign else f"{v:.{digits}f}"
    return str(v)


def compare_markdown(rows: Sequence[Mapping[str, Any]], base_label: str = "base", other_label: str = "other") -> str:
    """The comparison as one markdown table (one line per cell) with a legend."""
    header = [
        "dataset",
        "ratio",
        "queries",
        f"nDCG@10 {base_label}",
        f"nDCG@10 {other_label}",
        "Δ nDCG@10",
        "Kendall τ mean",
        "τ min",
        "Spearman ρ mean",
        "ρ min",
        "top-10 overlap mean",
        "min",
        "max \\|Δm\\| / σ",  # escaped: a bare | would split the markdown cell
        "mean \\|Δm\\| / σ",
        "σ (base margins)",
    ]
    several = len({(r["instruction"], r["checkpoint"]) for r in rows}) > 1
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for r in rows:
        name = r["dataset"] + (f" ({r['instruction']}, {r['checkpoint']})" if several else "")
        lines.append(
            "| "
            + " | ".join(
                [
                    name,
                    str(r["ratio"]),
                    str(r["queries"]),
                    _f(r["ndcg_base"]),
                    _f(r["ndcg_other"]),
                    _f(r["ndcg_delta"], sign=True),
                    _f(r["kendall_mean"]),
                    _f(r["kendall_min"]),
                    _f(r["spearman_mean"]),
                    _f(r["spearman_min"]),
                    _f(r["overlap_mean"], 3),
                    _f(r["overlap_min"], 3),
                    _f(r["max_rel_delta"]),
                    _f(r["mean_rel_delta"]),
                    _f(r["margin_spread"], 3),
                ]
            )
            + " |"
        )
    mismatched = [r for r in rows if r["only_base"] or r["only_other"]]
    legend = [
        "",
        f"{base_label} vs {other_label}. nDCG@10: trec_eval over every judged query (the results rows). "
        "τ, ρ: per-query Kendall tau-b and Spearman rank correlation of the two reranked candidate lists "
        "(mean and minimum over queries). Top-10 overlap: the share of a query's base top 10 that is in the other's "
        "top 10. Δm: other - base margin of each (query, passage) pair; "
        "σ: standard deviation of the base margins over those pairs.",
    ]
    if mismatched:
        legend.append(
            "Candidate lists differ in "
            + ", ".join(
                f"{r['dataset']} r={r['ratio']} ({r['only_base']} / {r['only_other']} pairs)" for r in mismatched
            )
            + ": only the common pairs are compared."
        )
    return "\n".join(lines + legend) + "\n"


__all__ = [
    "average_ranks",
    "compare_dirs",
    "compare_markdown",
    "compare_runs",
    "describe",
    "kendall_tau_b",
    "spearman_rho",
    "top_k",
]
