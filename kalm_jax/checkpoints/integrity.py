"""File checksums for checkpoints: written once a checkpoint is complete, verified before it is restored.

`<dir>/checksums.json` = {"format": "kalm-jax-checksums", "version": 1, "algorithm": "sha256",
"files": {relative path: {"size": bytes, "sha256": hex}}} over every regular file under the listed
sub-paths of `<dir>`. A flipped bit, a truncated or a missing file then fails `verify` with an
`IntegrityError` that names the file, instead of loading wrong weights or a multi-KB tensorstore error.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path

from kalm_jax import atomic

CHECKSUMS = "checksums.json"
FORMAT = "kalm-jax-checksums"
_CHUNK = 1 << 22


class IntegrityError(ValueError):
    """A checkpoint file is missing, truncated or does not match its recorded checksum."""


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _files(root: Path, parts: Iterable[str]) -> list[Path]:
    out: list[Path] = []
    for part in parts:
        p = root / part
        if p.is_file():
            out.append(p)
        elif p.is_dir():
            out.extend(sorted(f for f in p.rglob("*") if f.is_file()))
    return out


def write(root: str | os.PathLike, parts: Iterable[str]) -> Path:
    """Hashes every file under `root/<part>` for each part and writes `root/checksums.json` atomically."""
    root = Path(root)
    files = {
        str(f.relative_to(root)): {"size": f.stat().st_size, "sha256": file_sha256(f)} for f in _files(root, parts)
    }
    return atomic.write_text(
        root / CHECKSUMS,
        json.dumps({"format": FORMAT, "version": 1, "algorithm": "sha256", "files": files}, indent=0, sort_keys=True),
    )


def has_checksums(root: str | os.PathLike) -> bool:
    return (Path(root) / CHECKSUMS).is_file()


def verify(root: str | os.PathLike, *, prefixes: tuple[str, ...] = ()) -> bool:
    """Checks the files listed in `root/checksums.json` (only those under one of `prefixes`, if given).

    Returns False when there is no checksums file (an older checkpoint: nothing to verify), True when
    every file matches; raises `IntegrityError` naming the first missing, truncated or changed file.
    """
    root = Path(root)
    path = root / CHECKSUMS
    if not path.is_file():
        return False
    try:
        table = json.loads(path.read_text())
        files = table["files"]
        if table.get("format") != FORMAT or not isinstance(files, dict):
            raise ValueError(f"format {table.get('format')!r}")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise IntegrityError(f"{path}: unreadable checksums file ({e})") from None
    for rel, want in sorted(files.items()):
        if prefixes and not rel.startswith(prefixes):
            continue
        f = root / rel
        if not f.is_file():
            raise IntegrityError(f"{f}: missing (listed in {path})")
        size = f.stat().st_size
        if size != want["size"]:
            raise IntegrityError(f"{f}: truncated or changed ({size} bytes, {want['size']} when it was written)")
        if file_sha256(f) != want["sha256"]:
            raise IntegrityError(f"{f}: contents changed since it was written (sha256 mismatch): the file is corrupt")
    return True


__all__ = ["CHECKSUMS", "IntegrityError", "write", "verify", "has_checksums", "file_sha256"]
