"""Atomic directory writes: build in a temporary sibling, then rename into place."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


def replace_dir(tmp: Path, out: Path) -> None:
    """Renames `tmp` to `out`; an existing `out` is moved aside first and deleted only afterwards."""
    if not out.exists():
        os.replace(tmp, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.replace(out, old / out.name)
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(old / out.name, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(out: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yields an empty temporary directory beside `out`; when the block succeeds it becomes `out`.

    On any exception the temporary directory is removed and an existing `out` is left untouched, so an
    interrupted write never leaves a directory that looks complete.
    """
    out = Path(out).absolute()
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
