"""Exclusive locks: one writer per directory (eval.py's output_dir, train.py's workdir, the passage store).

    with exclusive_lock(directory, "training run"):   # raises DirectoryLocked naming the holder at once
        ...
    with file_lock(path, timeout=600, what="store"):  # waits (logging the holder), then raises LockHeld

The lock is ``fcntl.flock`` on a file (``<directory>/.lock`` for a directory); the file records the holder (pid,
host, start time) for the error message. The kernel releases the lock when its holder exits, killed or not, so a
stale lock never blocks a rerun. `job_lock` is the multi-process form: process 0 holds the lock for the whole job
and every process learns whether it got it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"


class DirectoryLocked(RuntimeError):
    """Another process holds the directory's lock (the message names the directory and the holder)."""


class LockHeld(RuntimeError):
    """Another process holds a `file_lock` (``holder``: what it wrote into the lock file)."""

    def __init__(self, path: Path, holder: str, waited: float):
        self.path, self.holder, self.waited = path, holder, waited
        super().__init__(f"{path} is held by {holder}" + (f" (waited {waited:.0f} s)" if waited else ""))


def _lock_holder(f) -> str:
    f.seek(0)
    return f.read().strip() or "another process"


@contextlib.contextmanager
def file_lock(path: str | os.PathLike, *, timeout: float = 0.0, what: str = "", poll: float = 0.2) -> Iterator[Path]:
    """Holds an exclusive lock (`fcntl.flock`) on the file `path` for the duration of the block.

    The holder writes ``pid P on HOST since TIME`` into the file. When another process holds it, waits up to
    `timeout` seconds (logging once who holds it, for `what`), then raises `LockHeld` naming the holder. The
    kernel releases the lock when its holder exits, killed or not, so a stale lock never blocks a rerun. The
    lock is per open file: a second `file_lock` on the same path in the same process waits like any other.
    """
    import datetime
    import fcntl
    import time

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    f = open(path, "a+")  # noqa: SIM115 - held open for the lock's lifetime, closed in the finally below
    try:
        start = time.monotonic()
        logged = False
        while True:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                waited = time.monotonic() - start
                if waited >= timeout:
                    raise LockHeld(path, _lock_holder(f), waited) from None
                if not logged:
                    log.warning(
                        "%s is locked by %s; waiting up to %s s for it%s",
                        path,
                        _lock_holder(f),
                        f"{timeout:g}",
                        f" ({what})" if what else "",
                    )
                    logged = True
                time.sleep(min(poll, max(0.0, timeout - waited)))
        if logged:
            log.info("%s: got the lock after %.1f s", path, time.monotonic() - start)
        f.seek(0)
        f.truncate()
        f.write(
            f"pid {os.getpid()} on {socket.gethostname()} since "
            f"{datetime.datetime.now().isoformat(timespec='seconds')}\n"
        )
        f.flush()
        yield path
    finally:
        f.close()  # releases the lock


@contextlib.contextmanager
def exclusive_lock(directory: str | os.PathLike, what: str = "run", hint: str = "") -> Iterator[Path]:
    """Holds an exclusive lock on `directory` (created if missing; `file_lock` on ``<directory>/.lock``) for the
    duration of the block.

    Raises `DirectoryLocked` ("<dir> is in use by another <what> (pid P on HOST since T)[; <hint>]") at once
    when another process holds it. Yields the lock file's path.
    """
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        try:
            path = stack.enter_context(file_lock(out / LOCK_FILE))
        except LockHeld as e:
            raise DirectoryLocked(
                f"{out} is in use by another {what} ({e.holder})" + (f"; {hint}" if hint else "")
            ) from None
        yield path


@contextlib.contextmanager
def job_lock(directory: str | os.PathLike, what: str = "run", hint: str = "") -> Iterator[None]:
    """`exclusive_lock` for a multi-process job: process 0 holds it for the block; every process raises
    `DirectoryLocked` when process 0 could not get it (every process must enter it: a collective)."""
    from kalm_jax.parallel import distributed

    with contextlib.ExitStack() as stack:
        refused = None
        if distributed.is_primary():
            try:
                stack.enter_context(exclusive_lock(directory, what, hint))
            except DirectoryLocked as e:
                refused = e
        if distributed.any_process(refused is not None):
            raise refused or DirectoryLocked(
                f"{directory} is in use by another {what} (process 0 could not lock it)" + (f"; {hint}" if hint else "")
            )
        yield


__all__ = ["file_lock", "exclusive_lock", "job_lock", "LockHeld", "DirectoryLocked", "LOCK_FILE"]
