"""Human-readable tables of benchmark rows (one table per row kind)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

# kind -> [(column title, row key, format)]
COLUMNS: dict[str, list[tuple[str, str, str]]] = {
    "encode": [
        ("shape", "shape", "s"),
        ("n", "n", "d"),
        ("batch", "batch", "d"),
        ("tokens/s", "tokens_per_s", ",.0f"),
        ("TFLOP/s", "flops_per_s", "t"),
        ("MFU", "mfu", "%"),
        ("median ms", "median_s", "ms"),
        ("compile s", "compile_s", ".1f"),
        ("program MiB", "program_bytes", "mib"),
        ("peak MiB", "peak_bytes", "mib"),
        ("cache B/passage", "cache_bytes_per_passage", ",d"),
    ],
    "score": [
        ("shape", "shape", "s"),
        ("n", "n", "d"),
        ("r", "r", "d"),
        ("batch", "batch", "d"),
        ("pairs/s", "pairs_per_s", ",.0f"),
        ("TFLOP/s", "flops_per_s", "t"),
        ("MFU", "mfu", "%"),
        ("median ms", "median_s", "ms"),
        ("host-states pairs/s", "pairs_per_s_host_states", ",.0f"),
        ("host-states ms", "median_s_host_states", "ms"),
        ("compile s", "compile_s", ".1f"),
        ("program MiB", "program_bytes", "mib"),
        ("peak MiB", "peak_bytes", "mib"),
        ("cache B/passage", "cache_bytes_per_passage", ",d"),
    ],
    "online_ratio": [
        ("shape", "shape", "s"),
        ("n", "n", "d"),
        ("r", "r", "d"),
        ("measured", "measured_ratio", ".2f"),
        ("analytic", "analytic_ratio", ".2f"),
        ("measured/analytic", "measured_over_analytic", ".2f"),
        ("cross-enc analytic", "cross_encoder_analytic_ratio", ".1f"),
    ],
    "peer": [
        ("shape", "shape", "s"),
        ("op", "op", "s"),
        ("n", "n", "d"),
        ("r", "r", "d"),
        ("ours tok/s", "ours_tokens_per_s", ",.0f"),
        ("peer tok/s", "peer_tokens_per_s", ",.0f"),
        ("ours pairs/s", "ours_pairs_per_s", ",.0f"),
        ("peer pairs/s", "peer_pairs_per_s", ",.0f"),
        ("speedup", "speedup", ".2f"),
        ("peer batch", "peer_batch", "d"),
        ("note", "peer_error", "s"),
    ],
    "side_by_side": [
        ("shape", "shape", "s"),
        ("path", "path", "s"),
        ("op", "op", "s"),
        ("n", "n", "d"),
        ("r", "r", "d"),
        ("batch", "batch", "d"),
        ("ours tok/s", "ours_tokens_per_s", ",.0f"),
        ("peer tok/s", "peer_tokens_per_s", ",.0f"),
        ("ours pairs/s", "ours_pairs_per_s", ",.1f"),
        ("peer pairs/s", "peer_pairs_per_s", ",.1f"),
        ("ours GFLOP/s", "ours_gflops_per_s", ",.0f"),
        ("peer GFLOP/s", "peer_gflops_per_s", ",.0f"),
        ("speedup", "speedup", ".2f"),
        ("min", "speedup_min", ".2f"),
        ("max", "speedup_max", ".2f"),
        ("rounds", "rounds", "d"),
        ("max abs Δ state", "max_abs_state_diff", ".1e"),
        ("max abs Δ margin", "max_abs_margin_diff", ".1e"),
    ],
    "quantized": [
        ("shape", "shape", "s"),
        ("weights", "quantization", "s"),
        ("op", "op", "s"),
        ("n", "n", "d"),
        ("r", "r", "d"),
        ("batch", "batch", "d"),
        ("median ms", "median_s", "ms"),
        ("tok/s", "tokens_per_s", ",.0f"),
        ("pairs/s", "pairs_per_s", ",.1f"),
        ("time / float", "ratio", ".3f"),
        ("min", "ratio_min", ".3f"),
        ("max", "ratio_max", ".3f"),
        ("rounds", "rounds", "d"),
        ("max abs Δ margin", "max_abs_margin_diff", ".1e"),
    ],
    "train": [
        ("shape", "shape", "s"),
        ("mode", "mode", "s"),
        ("batch", "batch", "d"),
        ("step ms", "step_s", "ms"),
        ("tokens/s", "tokens_per_s", ",.0f"),
        ("MFU", "mfu", "%"),
        ("compile s", "compile_s", ".1f"),
    ],
}


def fmt(value: Any, spec: str) -> str:
    if value is None:
        return "-"
    if spec == "s":
        return str(value)
    if spec == "%":
        return f"{100 * value:.1f}%"
    if spec == "ms":
        return f"{1000 * value:.2f}"
    if spec == "t":
        return f"{value / 1e12:.3f}"
    if spec == "mib":
        return f"{value / 2**20:,.1f}"
    return format(value, spec)


def tables(rows: Sequence[dict[str, Any]]) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, cells) per kind present in `rows`; skipped rows become one line each."""
    out = []
    for kind, cols in COLUMNS.items():
        measured = [r for r in rows if r["kind"] == kind and "skipped" not in r]
        skipped = [r for r in rows if r["kind"] == kind and "skipped" in r]
        if measured:
            keep = [c for c in cols if any(r.get(c[1]) is not None for r in measured)]
            out.append((kind, [c[0] for c in keep], [[fmt(r.get(k), f) for _, k, f in keep] for r in measured]))
        for r in skipped:
            out.append(
                (f"{kind} ({r['shape']}{', ' + r['mode'] if 'mode' in r else ''}) skipped: {r['skipped']}", [], [])
            )
    return out


def markdown(rows: Sequence[dict[str, Any]]) -> str:
    """The tables as GitHub markdown (what docs/performance.md shows)."""
    parts = []
    for title, header, cells in tables(rows):
        if not header:
            parts.append(f"*{title}*\n")
            continue
        lines = [f"**{title}**", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(c) + " |" for c in cells]
        parts.append("\n".join(lines) + "\n")
    return "\n".join(parts)


def print_tables(rows: Sequence[dict[str, Any]]) -> None:
    """Prints the tables with rich when available, else as markdown."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(markdown(rows))
        return
    console = Console(width=max(Console().width, 180))
    for title, header, cells in tables(rows):
        if not header:
            console.print(f"[yellow]{title}[/yellow]")
            continue
        table = Table(title=title)
        for h in header:
            table.add_column(h, justify="right")
        for c in cells:
            table.add_row(*c)
        console.print(table)


__all__ = ["COLUMNS", "tables", "markdown", "print_tables"]
