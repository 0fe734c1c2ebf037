"""One saeflow run per root at a time: an advisory file lock on `<root>/.saeflow.lock`.

Stores, checkpoints and the default MLflow store live under the root; two runs there would write the same
directories and race to create the SQLite schema. The lock is taken before any of that and released when the
process ends, however it ends (the kernel drops flock locks with the file descriptor, SIGKILL included).
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import socket
from collections.abc import Iterator

from saeflow.storage import layout


class RootBusyError(RuntimeError):
    """Another live saeflow run holds the root; str() is one line naming it and the fix."""


class RootNotWritableError(RuntimeError):
    """The root cannot be written (read-only file system, no permission); str() is one line naming it and the fix."""


RESERVE_BYTES = 1 << 20
"""Space set aside on the root's disk while a run holds it (`<root>/.saeflow.reserve`), freed when the run fails so
that a full disk still leaves room to mark its MLflow runs FAILED in a SQLite store beside it."""


_HELD: set[str] = set()
"""Roots this process holds (a flow that holds its root may call one that takes it again)."""


@contextlib.contextmanager
def root_lock(root: str) -> Iterator[None]:
    """Hold `root` for this process, or raise RootBusyError at once naming the run that holds it."""
    path = os.path.abspath(layout.lock_path(root))
    if path in _HELD:
        yield
        return
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise RootNotWritableError(
            f"cannot write to the root {os.path.abspath(root)} ({e.strerror}): set root to a writable directory "
            "(--set root=DIR)"
        ) from e
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RootBusyError(
                f"{os.path.abspath(root)} is in use by {_holder(fd)}: wait for it to finish, or run "
                "this one with another root (--set root=DIR)"
            ) from None
        os.ftruncate(fd, 0)
        os.write(
            fd,
            json.dumps(
                {
                    "pid": os.getpid(),
                    "host": socket.gethostname(),
                    "since": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                }
            ).encode(),
        )
        _HELD.add(path)
        _set_aside(root)
        try:
            yield
        finally:
            _HELD.discard(path)
    finally:
        os.close(fd)  # releases the lock


def _holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"saeflow pid {info['pid']} on {info['host']} (since {info['since']})"
    except (OSError, ValueError, KeyError):
        return "another saeflow run"


def _set_aside(root: str) -> None:
    try:
        with open(layout.reserve_path(root), "wb") as f:
            f.write(bytes(RESERVE_BYTES))
    except OSError:  # already full: there is nothing to set aside, and the run will say so
        pass


def free_reserve(root: str) -> None:
    """Give back the space `root_lock` set aside, so a run failing on a full disk can still close its runs."""
    with contextlib.suppress(OSError):
        os.remove(layout.reserve_path(root))
