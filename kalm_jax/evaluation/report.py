"""Sweep reports from OUT/results.jsonl: summary.md (markdown tables), results.csv and PNG plots.

Everything here is derived from the results file alone, so a report can be regenerated at any time
(``kalm-report OUT``) and never holds a number the results file does not.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from kalm_jax import atomic
from kalm_jax.evaluation.metrics import HEADLINE

QUALITY = ("ndcg_cut_10", "recip_rank", "map", "recall_100", "roc_auc")
LABELS = {"ndcg_cut_10": "nDCG@10", "recip_rank": "MRR@10", "map": "MAP", "recall_100": "R@100", "roc_auc": "ROC-AUC"}


def _fmt(v, digits: int = 4) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _bytes(n) -> str:
    if n is None:
        return "–"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n:.0f} B"
        n /= 1024
    return str(n)


def _short(ck: str | None) -> str:
    return "–" if ck is None else (Path(ck).name or ck)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _sort_key(r: Mapping[str, Any]):
    return (
        r["dataset"],
        r["stage"] != "first_stage",
        str(r.get("checkpoint")),
        str(r.get("instruction")),
        r.get("ratio") or 0,
    )


def summary_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    """Per dataset: quality of the first stage and every reranked cell, then cache size and online cost."""
    out = [
        "# Evaluation sweep summary",
        "",
        "Quality: trec_eval measures averaged over all judged queries (`-c`); MRR is cut at 10; binary "
        "measures use the dataset's relevance level. Cost: cache bytes on disk for the dataset's candidate "
        "passages at that ratio, and online seconds per query (prompt + state lookup + scoring, compilation "
        "excluded).",
        "",
    ]
    for ds in sorted({r["dataset"] for r in rows}):
        part = sorted((r for r in rows if r["dataset"] == ds), key=_sort_key)
        first = next((r for r in part if r["stage"] == "first_stage"), None)
        out += [f"## {ds} ({part[0]['split']})", ""]
        if first is not None:
            out.append(
                f"First stage: `{first.get('first_stage', '?')}`, {first.get('queries', '?')} queries, "
                f"relevance level {first.get('relevance_level', '?')}."
            )
            if first.get("warnings"):
                out.append("Data warnings: " + ", ".join(f"{v} × {k}" for k, v in first["warnings"].items()) + ".")
            out.append("")
        header = (
            ["stage", "checkpoint", "instruction", "ratio"]
            + [LABELS[m] for m in QUALITY]
            + ["cache / passage", "cache total", "online s / query"]
        )
        body = []
        base = first["metrics"].get(HEADLINE) if first else None
        for r in part:
            m, c = r["metrics"], r.get("cost") or {}
            ndcg = _fmt(m.get(HEADLINE))
            if r["stage"] == "rerank" and base is not None and m.get(HEADLINE) is not None:
                ndcg += f" ({m[HEADLINE] - base:+.4f})"
            body.append(
                [r["stage"], _short(r.get("checkpoint")), _fmt(r.get("instruction")), _fmt(r.get("ratio")), ndcg]
                + [_fmt(m.get(k)) for k in QUALITY[1:]]
                + [
                    _bytes(c.get("cache_bytes_per_passage")),
                    _bytes(c.get("cache_bytes")),
                    _fmt(c.get("online_seconds_per_query"), 5),
                ]
            )
        out += [_table(header, body), ""]
    return "\n".join(out)


def flat(row: Mapping[str, Any]) -> dict[str, Any]:
    """One CSV record: the cell keys, metrics as ``metric.<name>`` and costs as ``cost.<name>``."""
    d = {
        k: row.get(k)
        for k in (
            "dataset",
            "split",
            "stage",
            "checkpoint",
            "ratio",
            "instruction",
            "queries",
            "relevance_level",
            "run_file",
            "finished",
        )
    }
    d.update({f"metric.{k}": v for k, v in row.get("metrics", {}).items()})
    d.update({f"cost.{k}": v for k, v in (row.get("cost") or {}).items()})
    return d


def write_csv(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> None:
    records = [flat(r) for r in rows]
    fields = list(dict.fromkeys(k for r in records for k in r))
    with atomic.atomic_file(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(records)


def plot(rows: Sequence[Mapping[str, Any]], out_dir: str | os.PathLike) -> list[Path]:
    """PNG plots per dataset: nDCG@10 vs ratio, cache bytes/passage vs ratio, nDCG@10 vs online s/query."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for ds in sorted({r["dataset"] for r in rows}):
        rr = [r for r in rows if r["dataset"] == ds and r["stage"] == "rerank"]
        first = next((r for r in rows if r["dataset"] == ds and r["stage"] == "first_stage"), None)
        if not rr:
            continue
        series: dict[str, list] = {}
        for r in sorted(rr, key=lambda r: r["ratio"]):
            series.setdefault(f"{_short(r['checkpoint'])} / {r['instruction']}", []).append(r)
        specs = [
            ("ndcg_vs_ratio", "MEP ratio r", "nDCG@10", lambda r: r["ratio"], lambda r: r["metrics"][HEADLINE]),
            (
                "cache_vs_ratio",
                "MEP ratio r",
                "cache bytes / passage",
                lambda r: r["ratio"],
                lambda r: r["cost"]["cache_bytes_per_passage"],
            ),
            (
                "quality_vs_cost",
                "online seconds / query",
                "nDCG@10",
                lambda r: r["cost"]["online_seconds_per_query"],
                lambda r: r["metrics"][HEADLINE],
            ),
        ]
        for name, xl, yl, fx, fy in specs:
            fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=110)
            for label, pts in series.items():
                ax.plot([fx(p) for p in pts], [fy(p) for p in pts], marker="o", label=label)
                if name == "quality_vs_cost":
                    for p in pts:
                        ax.annotate(f"r={p['ratio']}", (fx(p), fy(p)), fontsize=7)
            if name != "quality_vs_cost":
                ax.set_xscale("log", base=2)
            if name == "cache_vs_ratio":
                ax.set_yscale("log")
            if first is not None and yl == "nDCG@10" and first["metrics"].get(HEADLINE) is not None:
                ax.axhline(first["metrics"][HEADLINE], color="gray", ls="--", label="first stage")
            ax.set_xlabel(xl)
            ax.set_ylabel(yl)
            ax.set_title(ds)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
            fig.tight_layout()
            path = out_dir / f"{ds.replace('/', '_')}.{name}.png"
            fig.savefig(path)
            plt.close(fig)
            written.append(path)
    return written


def write_report(output_dir: str | os.PathLike, rows: Sequence[Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """Writes OUT/summary.md, OUT/results.csv and OUT/plots/*.png; returns their paths."""
    from kalm_jax.evaluation.results import read_results

    out = Path(output_dir)
    rows = list(rows) if rows is not None else read_results(out)
    md = out / "summary.md"
    atomic.write_text(md, summary_markdown(rows))
    write_csv(rows, out / "results.csv")
    return {"summary": md, "csv": out / "results.csv", "plots": plot(rows, out / "plots")}
