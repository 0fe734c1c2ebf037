"""Failures of the machine under the stored bytes, recognised in any exception chain: a full disk, a read-only file
system. They are neither saeflow's bugs nor bad input, so they get one line (the CLI) and no retries (the tasks)."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator

_NO_SPACE = {errno.ENOSPC, errno.EDQUOT}
_NO_SPACE_TEXT = ("database or disk is full", *(os.strerror(n) for n in _NO_SPACE))


def exception_chain(exc: BaseException) -> Iterator[BaseException]:
    """`exc` and what it was raised from or during, outermost first (libraries wrap what they hit)."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def environment_failure(exc: BaseException, root: str | None = None) -> str | None:
    """One line for a failure of the machine rather than of saeflow or its input, found anywhere in the chain of
    `exc` (MLflow and Prefect wrap what they hit): a full disk or a read-only file system. None for anything else."""
    on = f" where the root ({root}) and its store live" if root else ""
    for e in exception_chain(exc):
        where = f" writing {e.filename}" if isinstance(e, OSError) and e.filename else ""
        text = str(e)  # libraries in other languages (sqlite, safetensors' Rust) pass the error on as text
        if (isinstance(e, OSError) and e.errno in _NO_SPACE) or any(m in text for m in _NO_SPACE_TEXT):
            return (
                f"no space left on the disk{where}: free some{on} (or set root/store to a bigger disk) and rerun "
                "the same command; finished stages are reused and training resumes from its last checkpoint"
            )
        if (isinstance(e, OSError) and e.errno == errno.EROFS) or os.strerror(errno.EROFS) in text:
            return f"read-only file system{where}: set root (and store) to a writable directory (--set root=DIR)"
    return None
