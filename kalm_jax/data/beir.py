"""BEIR-layout datasets: ``corpus.jsonl[.gz]``, ``queries.jsonl[.gz]``, ``qrels/<split>.tsv``.

Bad input (malformed JSON, missing ``_id``, empty texts, duplicate ids, malformed qrels rows, a truncated
gzip) raises `DataError` naming file and line; ``on_error="skip"`` skips such records and counts them in
`BeirDataset.skipped`. Qrels that reference a query or document absent from the files raise too, unless
``on_missing`` is "keep" (keep the judgment: right for evaluation, where an unretrievable judged document
still counts in the ideal DCG, e.g. TREC DL 2019 here) or "drop" (remove it, counted).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from kalm_jax.data.textfile import DataError, OnError, SkipCounter, atomic_write, handle, iter_jsonl, iter_lines

log = logging.getLogger(__name__)

OnMissing = Literal["raise", "keep", "drop"]
Doc = dict[str, str]
Qrels = dict[str, dict[str, int]]

QRELS_HEADER = ("query-id", "corpus-id", "score")


def passage_text(doc: Mapping[str, str]) -> str:
    """The passage string for a BEIR document: ``"{title} {text}"``, or just the text when the title is empty.

    This is the one place title and text are joined (the BEIR / sentence-transformers cross-encoder
    convention); whitespace at the ends is stripped.
    """
    title = (doc.get("title") or "").strip()
    text = (doc.get("text") or "").strip()
    return f"{title} {text}" if title and text else (title or text)


@dataclasses.dataclass
class BeirDataset:
    """A BEIR dataset restricted to one qrels split.

    Attributes:
      path: the dataset directory.
      split: the qrels split (None: all queries, no qrels).
      corpus: doc id -> {"title", "text"}.
      queries: query id -> text; with a split, only the queries judged in it, in qrels order.
      qrels: query id -> {doc id -> graded relevance}.
      skipped: records skipped or dropped on request, by reason.
    """

    path: Path
    split: str | None
    corpus: dict[str, Doc]
    queries: dict[str, str]
    qrels: Qrels
    skipped: SkipCounter = dataclasses.field(default_factory=SkipCounter)

    def passage(self, doc_id: str) -> str:
        """`passage_text` of one corpus document."""
        return passage_text(self.corpus[doc_id])

    def positives(self, qid: str, min_score: int = 1) -> list[str]:
        """Doc ids judged >= `min_score` for `qid`, in qrels order."""
        return [d for d, s in self.qrels.get(qid, {}).items() if s >= min_score]


def _find(directory: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (directory / name).is_file():
            return directory / name
    raise FileNotFoundError(f"{directory}: neither {stem} nor {stem}.gz exists")


def available_splits(data_dir: str | Path) -> list[str]:
    """Names of the qrels splits of a BEIR directory (``qrels/<split>.tsv``)."""
    qdir = Path(data_dir) / "qrels"
    if not qdir.is_dir():
        return []
    return sorted(p.name[: -len(".tsv")] for p in qdir.iterdir() if p.name.endswith(".tsv"))


def load_corpus(path: str | Path, on_error: OnError = "raise", skipped: SkipCounter | None = None) -> dict[str, Doc]:
    """Reads a BEIR corpus file: one ``{"_id", "title"?, "text"}`` object per line."""
    corpus: dict[str, Doc] = {}
    for lineno, obj in iter_jsonl(path, on_error, skipped):
        doc_id = obj.get("_id")
        if not isinstance(doc_id, (str, int)) or str(doc_id) == "":
            handle(DataError(path, lineno, "missing or empty '_id'"), on_error, skipped, "missing _id")
            continue
        doc_id = str(doc_id)
        title, text = obj.get("title") or "", obj.get("text")
        if not isinstance(text, str) or not isinstance(title, str):
            handle(
                DataError(path, lineno, f"doc {doc_id!r}: 'text' and 'title' must be strings"),
                on_error,
                skipped,
                "bad field type",
            )
            continue
        if not (title.strip() or text.strip()):
            handle(DataError(path, lineno, f"doc {doc_id!r} has empty title and text"), on_error, skipped, "empty doc")
            continue
        if doc_id in corpus:
            handle(DataError(path, lineno, f"duplicate doc id {doc_id!r}"), on_error, skipped, "duplicate doc id")
            continue
        corpus[doc_id] = {"title": title, "text": text}
    return corpus


def load_queries(path: str | Path, on_error: OnError = "raise", skipped: SkipCounter | None = None) -> dict[str, str]:
    """Reads a BEIR queries file: one ``{"_id", "text"}`` object per line."""
    queries: dict[str, str] = {}
    for lineno, obj in iter_jsonl(path, on_error, skipped):
        qid = obj.get("_id")
        if not isinstance(qid, (str, int)) or str(qid) == "":
            handle(DataError(path, lineno, "missing or empty '_id'"), on_error, skipped, "missing _id")
            continue
        qid = str(qid)
        text = obj.get("text")
        if not isinstance(text, str) or not text.strip():
            handle(
                DataError(path, lineno, f"query {qid!r} has empty or missing text"), on_error, skipped, "empty query"
            )
            continue
        if qid in queries:
            handle(DataError(path, lineno, f"duplicate query id {qid!r}"), on_error, skipped, "duplicate query id")
            continue
        queries[qid] = text
    return queries


def load_qrels(path: str | Path, on_error: OnError = "raise", skipped: SkipCounter | None = None) -> Qrels:
    """Reads BEIR qrels (``query-id<TAB>corpus-id<TAB>score`` with a header) or TREC qrels (``qid 0 docid rel``).

    A grade must be an integer (``2``, ``2.0``); ``0.9``, ``inf`` or ``nan`` are errors, as is a (query, doc)
    pair judged twice with different grades (an identical repeat is accepted).
    """
    qrels: Qrels = {}
    first_line: dict[tuple[str, str], int] = {}
    for lineno, line in iter_lines(path):
        if not line.strip():
            continue
        cols = line.split("\t") if "\t" in line else line.split()
        if lineno == 1 and tuple(c.strip() for c in cols[:3]) == QRELS_HEADER:
            continue
        if len(cols) == 4:
            qid, doc_id, score = cols[0], cols[2], cols[3]
        elif len(cols) == 3:
            qid, doc_id, score = cols
        else:
            handle(
                DataError(path, lineno, f"expected 3 (BEIR) or 4 (TREC) columns, got {len(cols)}"),
                on_error,
                skipped,
                "malformed qrels row",
            )
            continue
        try:
            value = float(score)
        except ValueError:
            handle(
                DataError(path, lineno, f"relevance {score!r} is not a number"),
                on_error,
                skipped,
                "malformed qrels row",
            )
            continue
        if not math.isfinite(value) or not value.is_integer():
            handle(
                DataError(path, lineno, f"relevance {score.strip()!r} is not an integer grade"),
                on_error,
                skipped,
                "malformed qrels row",
            )
            continue
        rel = int(value)
        q, d = qid.strip(), doc_id.strip()
        old = qrels.get(q, {}).get(d)
        if old is not None and old != rel:
            handle(
                DataError(
                    path,
                    lineno,
                    f"query {q!r} doc {d!r} judged {rel} here but {old} on line "
                    f"{first_line[(q, d)]} (conflicting duplicate)",
                ),
                on_error,
                skipped,
                "conflicting qrels duplicate",
            )
            continue
        first_line.setdefault((q, d), lineno)
        qrels.setdefault(q, {})[d] = rel
    return qrels


def load_beir(
    data_dir: str | Path,
    split: str | None = "test",
    *,
    on_error: OnError = "raise",
    on_missing: OnMissing = "raise",
) -> BeirDataset:
    """Loads a BEIR directory for one qrels split.

    Args:
      data_dir: directory holding ``corpus.jsonl[.gz]``, ``queries.jsonl[.gz]`` and ``qrels/``.
      split: qrels split name; an unknown split raises, listing the available ones. None loads all
        queries and no qrels.
      on_error: "raise" (default) or "skip" (counted) for malformed or empty records.
      on_missing: what to do with qrels referencing an unknown query or document: "raise", "keep", "drop".
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"{data_dir}: not a directory")
    qrels_path = None
    if split is not None:
        splits = available_splits(data_dir)
        qrels_path = data_dir / "qrels" / f"{split}.tsv"
        if split not in splits:
            raise ValueError(f"{data_dir}: unknown split {split!r}; available: {splits}")
    skipped = SkipCounter()
    corpus = load_corpus(_find(data_dir, "corpus.jsonl"), on_error, skipped)
    queries_path = _find(data_dir, "queries.jsonl")
    queries = load_queries(queries_path, on_error, skipped)
    qrels: Qrels = {}
    if qrels_path is not None:
        qrels = load_qrels(qrels_path, on_error, skipped)
        qrels = _check_missing(qrels, queries, corpus, qrels_path, on_missing, skipped)
        queries = {qid: queries[qid] for qid in qrels if qid in queries}
    if skipped.total:
        log.warning("%s: %s", data_dir, skipped)
    return BeirDataset(path=data_dir, split=split, corpus=corpus, queries=queries, qrels=qrels, skipped=skipped)


def _check_missing(
    qrels: Qrels,
    queries: Mapping[str, str],
    corpus: Mapping[str, Doc],
    path: Path,
    on_missing: OnMissing,
    skipped: SkipCounter,
) -> Qrels:
    if on_missing not in ("raise", "keep", "drop"):
        raise ValueError(f"on_missing must be 'raise', 'keep' or 'drop', got {on_missing!r}")
    missing_q = [q for q in qrels if q not in queries]
    missing_d = [(q, d) for q, docs in qrels.items() for d in docs if d not in corpus]
    if not missing_q and not missing_d:
        return qrels
    if on_missing == "raise":
        lines = _qrels_line_numbers(path)
        if missing_q:
            q = missing_q[0]
            raise DataError(
                path,
                lines.get((q, None)),
                f"query id {q!r} is not in queries.jsonl ({len(missing_q)} such queries); "
                "pass on_missing='keep' or 'drop' to accept",
            )
        q, d = missing_d[0]
        raise DataError(
            path,
            lines.get((q, d)),
            f"doc id {d!r} (query {q!r}) is not in the corpus ({len(missing_d)} such judgments); "
            "pass on_missing='keep' or 'drop' to accept",
        )
    skipped.counts["qrels query not in queries"] += len(missing_q)
    skipped.counts["qrels doc not in corpus"] += len(missing_d)
    log.warning(
        "%s: %d qrels queries not in queries.jsonl, %d judgments of docs not in the corpus (%s)",
        path,
        len(missing_q),
        len(missing_d),
        on_missing,
    )
    if on_missing == "keep":
        return qrels
    out: Qrels = {}
    for q, docs in qrels.items():
        if q not in queries:
            continue
        kept = {d: s for d, s in docs.items() if d in corpus}
        if kept:
            out[q] = kept
    return out


def _qrels_line_numbers(path: Path) -> dict[tuple[str, str | None], int]:
    first: dict[tuple[str, str | None], int] = {}
    for lineno, line in iter_lines(path):
        cols = line.split("\t") if "\t" in line else line.split()
        if len(cols) in (3, 4):
            q, d = cols[0].strip(), cols[-2].strip()
            first.setdefault((q, None), lineno)
            first.setdefault((q, d), lineno)
    return first


def write_beir(dataset: BeirDataset, out_dir: str | Path) -> None:
    """Writes a dataset in BEIR layout (``corpus.jsonl.gz``, ``queries.jsonl``, ``qrels/<split>.tsv``)."""
    out_dir = Path(out_dir)
    with atomic_write(out_dir / "corpus.jsonl.gz") as f:
        for doc_id, doc in dataset.corpus.items():
            f.write(
                json.dumps(
                    {"_id": doc_id, "title": doc.get("title", ""), "text": doc.get("text", "")}, ensure_ascii=False
                )
                + "\n"
            )
    with atomic_write(out_dir / "queries.jsonl") as f:
        for qid, text in dataset.queries.items():
            f.write(json.dumps({"_id": qid, "text": text}, ensure_ascii=False) + "\n")
    if dataset.split is not None:
        with atomic_write(out_dir / "qrels" / f"{dataset.split}.tsv") as f:
            f.write("\t".join(QRELS_HEADER) + "\n")
            for qid, docs in dataset.qrels.items():
                for doc_id, score in docs.items():
                    f.write(f"{qid}\t{doc_id}\t{score}\n")
