"""TREC run files (``qid Q0 docid rank score tag``), plain or gzip: read and write."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

from kalm_jax.data.textfile import DataError, OnError, SkipCounter, atomic_write, handle, iter_lines

Run = dict[str, dict[str, float]]


def read_run(path: str | Path, on_error: OnError = "raise", skipped: SkipCounter | None = None) -> Run:
    """Reads a TREC run into ``{qid: {docid: score}}`` (query order and within-query file order kept).

    Malformed rows (not 6 columns, a non-numeric or non-finite score, a document listed twice for one
    query) raise `DataError` naming file and line, or are counted in `skipped` with ``on_error="skip"``.
    """
    run: Run = {}
    for lineno, line in iter_lines(path):
        if not line.strip():
            continue
        cols = line.split()
        if len(cols) != 6:
            handle(
                DataError(path, lineno, f"expected 6 columns 'qid Q0 docid rank score tag', got {len(cols)}"),
                on_error,
                skipped,
                "malformed run row",
            )
            continue
        qid, _, doc_id, rank, score, _ = cols
        try:
            int(rank)
            value = float(score)
        except ValueError:
            handle(
                DataError(path, lineno, f"rank {rank!r} / score {score!r} is not a number"),
                on_error,
                skipped,
                "malformed run row",
            )
            continue
        if not math.isfinite(value):
            handle(DataError(path, lineno, f"score {score!r} is not finite"), on_error, skipped, "malformed run row")
            continue
        docs = run.setdefault(qid, {})
        if doc_id in docs:
            handle(
                DataError(path, lineno, f"doc {doc_id!r} listed twice for query {qid!r}"),
                on_error,
                skipped,
                "duplicate run entry",
            )
            continue
        docs[doc_id] = value
    return run


def ranked(docs: Mapping[str, float], k: int | None = None) -> list[tuple[str, float]]:
    """``(docid, score)`` by descending score, ties by ascending doc id, top `k`.

    trec_eval ignores the rank column and re-sorts ties itself, so equal scores are best avoided.
    """
    items = sorted(docs.items(), key=lambda kv: (-kv[1], kv[0]))
    return items if k is None else items[:k]


def write_run(
    run: Mapping[str, Mapping[str, float]], path: str | Path, tag: str = "kalm_jax", k: int | None = None
) -> None:
    """Writes a run (gzip if ``*.gz``) atomically, ranks 1..n by descending score, at most `k` per query.

    Scores are written as the shortest text that reads back as the same float64 (``repr``; a float32 score
    as the float64 of its value), so metrics recomputed from the file equal those of the in-memory run even
    for scores that differ only in their last digits (rounding them would create ties trec_eval reorders).
    """
    if not tag or any(c.isspace() for c in tag):
        raise ValueError(f"run tag must be a non-empty string without whitespace, got {tag!r}")
    with atomic_write(path) as f:
        for qid, docs in run.items():
            for rank, (doc_id, score) in enumerate(ranked(docs, k), start=1):
                if any(c.isspace() for c in qid + doc_id):
                    raise ValueError(f"{path}: ids must not contain whitespace: {qid!r} / {doc_id!r}")
                f.write(f"{qid} Q0 {doc_id} {rank} {float(score)!r} {tag}\n")
