"""Exclusive directory locks: one writer per directory (eval.py's output_dir, train.py's workdir, ...).

    with exclusive_lock(directory, "training run"):   # raises DirectoryLocked naming the holder
        ...

The lock is ``fcntl.flock`` on ``<directory>/.lock``; the file records the holder (pid, host, start time) for
the error message. The kernel releases the lock when its holder exits, killed or not, so a stale lock never
blocks a rerun. `job_lock` is the multi-process form: process 0 holds the lock for the whole job and every
process learns whether it got it.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import os
import socket
from pathlib import Path
from typing import Iterator

LOCK_FILE = ".lock"


class DirectoryLocked(RuntimeError):
    """Another process holds the directory's lock (the message names the directory and the holder)."""


@contextlib.contextmanager
def exclusive_lock(directory: str | os.PathLike, what: str = "run", hint: str = "") -> Iterator[Path]:
    """Holds an exclusive lock on `directory` (created if missing) for the duration of the block.

    Raises `DirectoryLocked` ("<dir> is in use by another <what> (pid P on HOST since T)[; <hint>]") at once
    when another process holds it. Yields the lock file's path.
    """
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK_FILE
    f = open(path, "a+")
    try:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise DirectoryLocked(f"{out} is in use by another {what} ({holder})"
                                  + (f"; {hint}" if hint else "")) from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()} since "
                f"{datetime.datetime.now().isoformat(timespec='seconds')}\n")
        f.flush()
        yield path
    finally:
        f.close()  # releases the lock


@contextlib.contextmanager
def job_lock(directory: str | os.PathLike, what: str = "run", hint: str = "") -> Iterator[None]:
    """`exclusive_lock` for a multi-process job: process 0 holds it for the block; every process raises
    `DirectoryLocked` when process 0 could not get it (every process must enter it: a collective)."""
    from kalm_jax import distributed

    with contextlib.ExitStack() as stack:
        refused = None
        if distributed.is_primary():
            try:
                stack.enter_context(exclusive_lock(directory, what, hint))
            except DirectoryLocked as e:
                refused = e
        if distributed.any_process(refused is not None):
            raise refused or DirectoryLocked(f"{directory} is in use by another {what} (process 0 could not lock "
                                             f"it)" + (f"; {hint}" if hint else ""))
        yield


__all__ = ["exclusive_lock", "job_lock", "DirectoryLocked", "LOCK_FILE"]
