"""Line-oriented reading and atomic writing of plain or gzip text files, with errors naming file and line."""

from __future__ import annotations

import gzip
import json
import logging
import zlib
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Literal

from kalm_jax.atomic import atomic_file

log = logging.getLogger(__name__)

OnError = Literal["raise", "skip"]


class DataError(ValueError):
    """Bad input data; the message names the file and, where there is one, the 1-based line."""

    def __init__(self, path: str | Path, line: int | None, message: str):
        self.path = str(path)
        self.line = line
        where = f"{path}:{line}" if line is not None else str(path)
        super().__init__(f"{where}: {message}")


class SkipCounter:
    """Counts records skipped on request (``on_error="skip"``), by reason, and logs each one."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def skip(self, err: DataError, reason: str) -> None:
        self.counts[reason] += 1
        log.warning("skipped (%s): %s", reason, err)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def __repr__(self) -> str:
        return f"SkipCounter({dict(self.counts)})"


def handle(err: DataError, on_error: OnError, skipped: SkipCounter | None, reason: str) -> None:
    """Raises `err`, or counts it as skipped when the caller asked for ``on_error="skip"``."""
    if on_error == "raise":
        raise err
    if on_error != "skip":
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if skipped is None:
        raise ValueError("on_error='skip' needs a SkipCounter so skips are counted, not silent")
    skipped.skip(err, reason)


def is_gzip(path: str | Path) -> bool:
    return str(path).endswith(".gz")


def open_text(path: str | Path, mode: str = "r", gz: bool | None = None) -> IO[str]:
    """Opens a text file, transparently (un)gzipping ``*.gz`` (or when `gz` says so).

    Reading skips a leading UTF-8 byte-order mark (``utf-8-sig``: files saved by Windows editors); writing
    never adds one."""
    encoding = "utf-8-sig" if mode.startswith("r") else "utf-8"
    if is_gzip(path) if gz is None else gz:
        return gzip.open(path, mode + "t", encoding=encoding)
    return open(path, mode, encoding=encoding)


def iter_lines(path: str | Path) -> Iterator[tuple[int, str]]:
    """Yields ``(line_number, line)`` without the trailing newline (1-based numbers).

    A truncated or corrupt gzip stream, or undecodable UTF-8, raises `DataError` naming the file and
    the line where reading failed.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    lineno = 0
    try:
        with open_text(path) as f:
            for lineno, line in enumerate(f, start=1):
                yield lineno, line.rstrip("\n").rstrip("\r")
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise DataError(path, lineno + 1, f"compressed stream is truncated or corrupt ({e})") from e
    except UnicodeDecodeError as e:
        raise DataError(path, lineno + 1, f"not valid UTF-8 ({e})") from e


def iter_jsonl(
    path: str | Path, on_error: OnError = "raise", skipped: SkipCounter | None = None
) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yields ``(line_number, object)`` for each non-blank line holding a JSON object."""
    for lineno, line in iter_lines(path):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            handle(
                DataError(path, lineno, f"malformed JSON ({e.msg} at column {e.colno})"),
                on_error,
                skipped,
                "malformed JSON",
            )
            continue
        if not isinstance(obj, dict):
            handle(
                DataError(path, lineno, f"expected a JSON object, got {type(obj).__name__}"),
                on_error,
                skipped,
                "not a JSON object",
            )
            continue
        yield lineno, obj


@contextmanager
def atomic_write(path: str | Path) -> Iterator[IO[str]]:
    """Writes a text file (gzip if ``*.gz``) through a temporary file renamed into place on success."""
    path = Path(path)
    with atomic_file(path) as tmp, open_text(tmp, "w", gz=is_gzip(path)) as f:
        yield f
