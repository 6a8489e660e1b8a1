"""Runs the whole benchmark: PyTorch peer rows first (then its memory is freed), the measured matmul peak,
then kalm-jax rows per preset; writes the JSON list after every row so an interrupted run keeps its rows."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kalm_jax import atomic
from kalm_jax.perf.bench import peer as peer_lib
from kalm_jax.perf.bench import suite
from kalm_jax.perf.bench.timing import measure_matmul_peak


def write_rows(rows: list[dict[str, Any]], out: Path | None) -> None:
    if out is None:
        return
    atomic.write_text(out, json.dumps(rows, indent=1))


def _peer_rows(settings: suite.BenchSettings, device: str, progress: Callable[[str], None]) -> list[dict]:
    """Raw peer measurements for every (shape, op, n, r) of the grid, with the batches kalm-jax uses."""
    out = []
    kw = dict(warmup=settings.warmup, repeats=settings.repeats, rotations=settings.rotations, seed=settings.seed)
    for name in settings.shapes:
        p = peer_lib.build(name, device, settings.dtype, settings.seed)
        for n in settings.encode_lengths:
            progress(f"peer {name} encode n={n}")
            out.append({"shape": name, **peer_lib.encode_row(p, n, max(1, settings.encode_tokens // n), **kw)})
        for n in settings.score_lengths:
            for r in settings.ratios:
                progress(f"peer {name} score n={n} r={r}")
                batch = min(settings.candidates, settings.score_batch)
                out.append({"shape": name, **peer_lib.score_row(p, n, r, batch, settings.prompt_len, **kw)})
        peer_lib.release(p)
    return out


def _join_peer(raw: dict[str, Any], ours: dict[str, Any], peak: float) -> dict[str, Any]:
    rate = "tokens_per_s" if raw["op"] == "encode" else "pairs_per_s"
    row = {
        "kind": "peer",
        "shape": raw["shape"],
        "op": raw["op"],
        "n": raw["n"],
        "r": raw["r"],
        "device": ours["device"],
        "dtype": ours["dtype"],
        "peer_impl": "transformers T5Gemma2 sdpa",
        "peer_batch": raw["batch"],
        "ours_batch": ours["batch"],
        f"ours_{rate}": ours[rate],
    }
    if "error" in raw:
        return {**row, "peer_error": raw["error"], f"peer_{rate}": None, "speedup": None}
    return {
        **row,
        f"peer_{rate}": raw[rate],
        "speedup": ours[rate] / raw[rate],
        "peer_mfu": raw["flops_per_s"] / peak if peak else None,
        "ours_mfu": ours.get("mfu"),
        "peer_median_s": raw["median_s"],
        "peer_peak_bytes": raw["peak_bytes"],
    }


def run(
    settings: suite.BenchSettings,
    *,
    peer: bool | None = None,
    peer_on_cpu: bool = False,
    out: Path | None = None,
    peak_sizes=None,
    progress: Callable[[str], None] = lambda _: None,
    on_row: Callable[[dict[str, Any]], None] = lambda _: None,
) -> list[dict[str, Any]]:
    """All rows for `settings`. `peer`: None = run the peer when torch + CUDA exist (or `peer_on_cpu`)."""
    rows: list[dict[str, Any]] = []

    def add(row: dict[str, Any]) -> None:
        rows.append(row)
        on_row(row)
        write_rows(rows, out)

    raw_peer: list[dict] = []
    device, why = peer_lib.availability(peer_on_cpu)
    if peer is False:
        why = "disabled by --config.peer=off"
    elif device is not None:
        raw_peer = _peer_rows(settings, device, progress)
    for name in settings.shapes if why else ():
        add({"kind": "peer", "shape": name, "skipped": why})

    progress("measuring the matmul peak")
    peak = measure_matmul_peak(settings.dtype, peak_sizes)
    for name in settings.shapes:
        ours: dict[tuple, dict] = {}
        for row in suite.shape_rows(name, settings, peak["peak_flops"], progress):
            row = {**row, "peak_flops": peak["peak_flops"]}
            if row["kind"] in ("encode", "score") and "skipped" not in row:
                ours[(row["kind"], row["n"], row["r"])] = row
            add(row)
        for raw in raw_peer:
            key = (raw["op"], raw["n"], raw["r"])
            if raw["shape"] == name and key in ours:
                add(_join_peer(raw, ours[key], peak["peak_flops"]))
    return rows


__all__ = ["run"]
