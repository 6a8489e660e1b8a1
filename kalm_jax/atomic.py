"""Atomic writes of files and directories: build in a temporary sibling, then rename into place.

Files (`atomic_file`, `write_text`, `write_bytes`): a hidden `.F.tmp-<host>-<pid>-*` sibling renamed onto `F`
on success and removed on failure; readers see the old or the new content, never a part.

Directories (recoverable after a kill):

For an output `D`, the hidden siblings (each named with the writer's host and pid) are
  `.D.tmp-<host>-<pid>-*`   being built (incomplete); removed when the block fails, or by a later writer or
                            reader once process <pid> on <host> is gone (a stale leftover of a kill);
  `.D.new-<host>-<pid>-*`   complete, waiting to be renamed to `D`;
  `.D.old-<host>-<pid>-*/D` the previous `D`, moved aside while the new one is renamed into place.
A kill at any point leaves `D` intact or leaves enough for `recover(D)` (run by every writer and by the
loaders before they open `D`) to finish the swap: a complete new copy wins, else the old copy is put back.
`recover` only touches siblings whose writer is gone, so it never races a live writer on the same host.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)


def _host() -> str:
    return socket.gethostname().replace("-", "_").replace(".", "_") or "host"


def _prefix(out: Path, kind: str) -> str:
    return f".{out.name}.{kind}-{_host()}-{os.getpid()}-"


def _writer_gone(p: Path, out: Path, kind: str) -> bool:
    """Whether the process that made sibling `p` has exited (unknown hosts/names count as alive for
    temporaries, which are only ever deleted, and as gone for complete copies, which are only moved)."""
    parts = p.name[len(f".{out.name}.{kind}-") :].split("-")
    if len(parts) < 2 or not parts[1].isdigit():
        return kind != "tmp"
    if parts[0] != _host():
        return kind != "tmp"
    return not _alive(int(parts[1]))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _siblings(out: Path, kind: str) -> list[Path]:
    if not out.parent.is_dir():
        return []
    return sorted(p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.{kind}-"))


def recover(out: str | os.PathLike) -> None:
    """Finishes or undoes a swap of `out` interrupted by a kill, and removes stale temporary siblings.

    Safe to call at any time and from readers: it only acts on leftovers of dead processes and on
    completed copies. Never removes the only copy of anything.
    """
    out = Path(out).absolute()
    new = [p for p in _siblings(out, "new") if p.is_dir() and _writer_gone(p, out, "new")]
    old = [p / out.name for p in _siblings(out, "old") if (p / out.name).exists() and _writer_gone(p, out, "old")]
    if new:  # a complete new copy: finish the interrupted swap
        aside = None
        if out.exists():
            aside = Path(tempfile.mkdtemp(prefix=_prefix(out, "old"), dir=out.parent))
            os.replace(out, aside / out.name)
        os.replace(new[-1], out)
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
        log.warning("%s: finished an interrupted atomic replace (the complete new copy is now in place)", out)
    elif not out.exists() and old:  # killed after moving the old copy aside, before the new one was complete
        os.replace(old[-1], out)
        log.warning("%s: restored the previous copy after an interrupted atomic replace", out)
    if out.exists():  # the swap is complete: copies moved aside by gone writers are stale
        for p in _siblings(out, "old"):
            if _writer_gone(p, out, "old"):
                shutil.rmtree(p, ignore_errors=True)
    for p in _siblings(out, "tmp"):
        if _writer_gone(p, out, "tmp"):
            shutil.rmtree(p, ignore_errors=True)


def replace_dir(tmp: Path, out: Path) -> None:
    """Renames the complete directory `tmp` to `out`; an existing `out` is moved aside first and deleted
    only once the new one is in place (see the module docstring for how a kill is recovered)."""
    new = Path(tempfile.mkdtemp(prefix=_prefix(out, "new"), dir=out.parent))
    os.rmdir(new)
    os.replace(tmp, new)  # from here on the new copy is known to be complete
    if not out.exists():
        os.replace(new, out)
        return
    old = Path(tempfile.mkdtemp(prefix=_prefix(out, "old"), dir=out.parent))
    os.replace(out, old / out.name)
    try:
        os.replace(new, out)
    except BaseException:
        os.replace(old / out.name, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


class DiskFullError(OSError):
    """The disk filled up while writing (the file or directory is named; nothing complete-looking is left)."""


def as_disk_full(err: BaseException, path: str | os.PathLike) -> DiskFullError | None:
    """`err` as a `DiskFullError` naming `path` when it is an out-of-space error (ENOSPC, or numpy's
    "N requested and M written" from a short write); None otherwise."""
    if isinstance(err, DiskFullError):
        return err
    if isinstance(err, OSError) and (err.errno == errno.ENOSPC or "requested and" in str(err)):
        return DiskFullError(errno.ENOSPC, f"{path}: the disk is full (writing stopped: {err})")
    return None


@contextlib.contextmanager
def atomic_directory(out: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yields an empty temporary directory beside `out`; when the block succeeds it becomes `out`.

    On any exception the temporary directory is removed and an existing `out` is left untouched, so an
    interrupted write never leaves a directory that looks complete. A swap interrupted by an earlier kill
    is finished first (`recover`).
    """
    out = Path(out).absolute()
    recover(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=_prefix(out, "tmp"), dir=out.parent))
    try:
        yield tmp
        replace_dir(tmp, out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        full = as_disk_full(e, out)
        if full is not None and full is not e:
            raise full from None
        raise


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path beside `path` to write; when the block succeeds it replaces `path`.

    The parent directory is created. On any exception the temporary file is removed and `path` is left as it
    was; an out-of-space error is raised as `DiskFullError` naming `path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=_prefix(path, "tmp"), dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        full = as_disk_full(e, path)
        if full is not None and full is not e:
            raise full from None
        raise


def write_text(path: str | os.PathLike, text: str, *, newline: str | None = None) -> Path:
    """Writes `text` (UTF-8) to `path` atomically (`atomic_file`); returns `path`."""
    with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8", newline=newline) as f:
        f.write(text)
    return Path(path)


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Writes `data` to `path` atomically (`atomic_file`); returns `path`."""
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


__all__ = [
    "atomic_file",
    "write_text",
    "write_bytes",
    "atomic_directory",
    "replace_dir",
    "recover",
    "DiskFullError",
    "as_disk_full",
]
