"""Reranker training JSONL in the FlagEmbedding format: read, validate, write.

One JSON object per line::

    {"query": str, "pos": [str, ...], "neg": [str, ...],
     "pos_scores": [float, ...]?, "neg_scores": [float, ...]?, "prompt": str?}

``pos_scores``/``neg_scores`` are teacher scores for distillation (this project reads them as teacher
P(yes) in [0, 1]); ``prompt`` is the task instruction for that example. Extension fields written by
`kalm_jax.data.negatives` and kept on read: ``qid`` (str), ``pos_ids``/``neg_ids`` (doc ids parallel to
``pos``/``neg``). Other keys are ignored.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from kalm_jax.data.textfile import DataError, OnError, SkipCounter, atomic_write, handle, iter_jsonl


@dataclasses.dataclass
class TrainingExample:
    """One query with its positive and negative passages (texts, not ids)."""

    query: str
    pos: list[str]
    neg: list[str]
    pos_scores: list[float] | None = None
    neg_scores: list[float] | None = None
    prompt: str | None = None
    qid: str | None = None
    pos_ids: list[str] | None = None
    neg_ids: list[str] | None = None

    def to_json(self) -> dict[str, Any]:
        """The JSON object, without None fields."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


def _str_list(obj: dict[str, Any], key: str, allow_empty_list: bool) -> list[str]:
    value = obj.get(key)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"'{key}' must be a list of strings")
    if not value and not allow_empty_list:
        raise ValueError(f"'{key}' is empty")
    for i, v in enumerate(value):
        if not v.strip():
            raise ValueError(f"'{key}'[{i}] is an empty text")
    return value


def _scores(obj: dict[str, Any], key: str, n: int) -> list[float] | None:
    if key not in obj or obj[key] is None:
        return None
    value = obj[key]
    if not isinstance(value, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        raise ValueError(f"'{key}' must be a list of numbers")
    if len(value) != n:
        raise ValueError(f"'{key}' has {len(value)} scores for {n} passages")
    if not all(math.isfinite(v) for v in value):
        raise ValueError(f"'{key}' holds a non-finite score")
    return [float(v) for v in value]


def parse_example(obj: dict[str, Any], min_neg: int = 1) -> TrainingExample:
    """Validates one JSON object; raises ValueError describing the first problem."""
    query = obj.get("query")
    if not isinstance(query, str) or not query.strip():
        raise ValueError("'query' must be a non-empty string")
    pos = _str_list(obj, "pos", allow_empty_list=False)
    neg = _str_list(obj, "neg", allow_empty_list=min_neg == 0)
    if len(neg) < min_neg:
        raise ValueError(f"'neg' has {len(neg)} passages, fewer than {min_neg}")
    prompt = obj.get("prompt")
    if prompt is not None and not isinstance(prompt, str):
        raise ValueError("'prompt' must be a string")
    qid = obj.get("qid")
    if qid is not None and not isinstance(qid, (str, int)):
        raise ValueError("'qid' must be a string")
    ids: dict[str, list[str] | None] = {}
    for key, texts in (("pos_ids", pos), ("neg_ids", neg)):
        value = obj.get(key)
        if value is not None and (not isinstance(value, list) or len(value) != len(texts)):
            raise ValueError(f"'{key}' must be a list as long as its texts")
        ids[key] = [str(v) for v in value] if value is not None else None
    return TrainingExample(
        query=query,
        pos=pos,
        neg=neg,
        pos_scores=_scores(obj, "pos_scores", len(pos)),
        neg_scores=_scores(obj, "neg_scores", len(neg)),
        prompt=prompt,
        qid=str(qid) if qid is not None else None,
        **ids,
    )


def iter_training_jsonl(
    path: str | Path, on_error: OnError = "raise", skipped: SkipCounter | None = None, min_neg: int = 1
) -> Iterator[tuple[int, TrainingExample]]:
    """Yields ``(line_number, example)``; invalid lines raise `DataError` (file:line) or are counted skips."""
    for lineno, obj in iter_jsonl(path, on_error, skipped):
        try:
            yield lineno, parse_example(obj, min_neg=min_neg)
        except ValueError as e:
            handle(DataError(path, lineno, str(e)), on_error, skipped, "invalid training example")


def read_training_jsonl(
    path: str | Path, on_error: OnError = "raise", skipped: SkipCounter | None = None, min_neg: int = 1
) -> list[TrainingExample]:
    """All valid examples of a training JSONL file (plain or ``.gz``)."""
    return [ex for _, ex in iter_training_jsonl(path, on_error, skipped, min_neg)]


def write_training_jsonl(examples: Iterable[TrainingExample], path: str | Path) -> int:
    """Writes examples atomically (gzip if ``*.gz``); returns how many were written."""
    n = 0
    with atomic_write(path) as f:
        for ex in examples:
            parse_example(ex.to_json(), min_neg=0)
            f.write(json.dumps(ex.to_json(), ensure_ascii=False) + "\n")
            n += 1
    return n
