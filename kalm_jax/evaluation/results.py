"""The sweep's results file: ``OUT/results.jsonl`` (one JSON row per finished cell),
``OUT/sweep_config.json`` (the settings the rows depend on) and ``OUT/.lock`` (one run per directory).

A *complete row* is a line that parses as a JSON object, with or without its final newline; only an
unparseable last line is torn (a kill mid-append). `read_results` and `append` share that one definition
(`scan`): the reader skips a torn last line, the appender drops it (and adds a missing final newline to a
complete last row instead of deleting it).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kalm_jax import atomic, locks
from kalm_jax.evaluation.settings import Settings, SweepConfigError

log = logging.getLogger(__name__)

RESULTS = "results.jsonl"
CONFIG_FILE = "sweep_config.json"


def cell_key(row: Mapping[str, Any]) -> tuple:
    return (row["dataset"], row["split"], row["stage"], row.get("checkpoint"), row.get("ratio"), row.get("instruction"))


LOCK_FILE = locks.LOCK_FILE
OutputDirLocked = locks.DirectoryLocked
LOCK_HINT = "wait for it to finish or use another output_dir (two runs would duplicate every cell)"
"""Another run holds the output directory's lock (the shared `locks.DirectoryLocked`)."""


def scan(data: bytes, path: Path | str = RESULTS) -> tuple[list[dict[str, Any]], int, bool]:
    """Parses results.jsonl bytes: (complete rows, byte length of the complete part, whether it lacks a
    final newline). A torn last line is excluded from both; any other unparseable line is an error."""
    rows: list[dict[str, Any]] = []
    lines = data.split(b"\n")
    last = max((i for i, ln in enumerate(lines) if ln.strip()), default=-1)
    end = 0
    pos = 0
    for i, line in enumerate(lines):
        start, pos = pos, pos + len(line) + 1
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError(f"a JSON {type(row).__name__}, not an object")
        except (ValueError, UnicodeDecodeError) as e:
            if i == last:
                log.warning(
                    "%s:%d: ignoring a torn last line (interrupted write); the cell will be redone", path, i + 1
                )
                return rows, start, False
            raise ValueError(f"{path}:{i + 1}: not a JSON row ({e})") from None
        rows.append(row)
        end = min(pos, len(data))
    return rows, end, bool(data[:end]) and not data[:end].endswith(b"\n")


def read_results(output_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Complete rows of OUT/results.jsonl (see `scan`); a torn last line is ignored with a warning."""
    path = Path(output_dir) / RESULTS
    if not path.is_file():
        return []
    return scan(path.read_bytes(), path)[0]


def append(output_dir: Path, row: Mapping[str, Any]) -> None:
    """Appends one row (flushed and fsynced). A torn last line is dropped first; a complete last row that
    lacks its newline gets one (it is never deleted)."""
    path = output_dir / RESULTS
    with open(path, "a+b") as f:
        f.seek(0)
        data = f.read()
        _, end, no_newline = scan(data, path)
        if end < len(data) and data[end:].strip():
            f.truncate(end)
            log.warning("%s: removed a torn last line left by an interrupted write", path)
        prefix = b"\n" if no_newline else b""
        f.write(prefix + (json.dumps(row, sort_keys=True) + "\n").encode())
        f.flush()
        os.fsync(f.fileno())


def output_lock(output_dir: str | os.PathLike) -> contextlib.AbstractContextManager[Path]:
    """Holds an exclusive lock on `output_dir` (OUT/.lock) for the duration of the block: `locks.exclusive_lock`.

    Raises `OutputDirLocked` naming the holder when another process holds it. The kernel releases the
    lock when its holder exits, killed or not, so a stale lock never blocks a rerun.
    """
    return locks.exclusive_lock(output_dir, "run", LOCK_HINT)


def output_job_lock(output_dir: str | os.PathLike) -> contextlib.AbstractContextManager[None]:
    """`output_lock` for a multi-process sweep (`locks.job_lock`): process 0 holds it, every process learns
    whether it got it."""
    return locks.job_lock(output_dir, "run", LOCK_HINT)


def check_output_dir(settings: Settings) -> None:
    out = settings.output_dir
    out.mkdir(parents=True, exist_ok=True)
    path = out / CONFIG_FILE
    ident = settings.identity()
    if path.is_file():
        try:
            stored = json.loads(path.read_text()).get("identity", {})
        except (ValueError, UnicodeDecodeError, AttributeError) as e:
            raise SweepConfigError(
                f"{path}: not a valid sweep config ({type(e).__name__}: {e}); it records which "
                f"settings produced {RESULTS}: restore it or use a new output_dir"
            ) from None
        diff = {k: (stored.get(k), v) for k, v in ident.items() if stored.get(k) != v}
        if diff:
            details = "; ".join(f"{k}: results used {a!r}, now {b!r}" for k, (a, b) in diff.items())
            raise SweepConfigError(
                f"{out} holds results of a different configuration ({details}); "
                "use a new output_dir (finished results are never overwritten)"
            )
    elif (out / RESULTS).exists():
        raise SweepConfigError(
            f"{out} has {RESULTS} but no {CONFIG_FILE}: cannot tell which settings produced it; use a new output_dir"
        )
    else:
        atomic.write_text(path, json.dumps({"identity": ident}, indent=1, sort_keys=True))


__all__ = [
    "RESULTS",
    "CONFIG_FILE",
    "LOCK_FILE",
    "OutputDirLocked",
    "cell_key",
    "scan",
    "read_results",
    "append",
    "check_output_dir",
    "output_lock",
    "output_job_lock",
]
