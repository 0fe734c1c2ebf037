"""Ctrl-C and SIGTERM never cut a write to the tracking store in half.

Python raises KeyboardInterrupt between any two bytecodes. Inside MLflow's SQLite store that can land between an
INSERT and its commit, and the traceback then keeps the open transaction (and its write lock) alive while the
flow tries to mark its runs FAILED: "database is locked". The CLI's signal handlers call `interrupt`, which waits
while the main thread is inside a tracker call (`whole`) and raises when that call returns.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

_depth = 0
_pending: BaseException | None = None


@contextlib.contextmanager
def whole() -> Iterator[None]:
    """A section an interrupt waits for (counted on the main thread only: signal handlers run there)."""
    global _depth, _pending
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if _depth == 0 and _pending is not None:
            exc, _pending = _pending, None
            raise exc


def interrupt(exc: BaseException) -> None:
    """Raise `exc` now, or as soon as the main thread leaves its current `whole` section."""
    global _pending
    if _depth:
        _pending = _pending or exc
        return
    raise exc


class WholeCalls:
    """`target` with each of its methods run as a `whole` section."""

    def __init__(self, target: Any):
        self._target = target

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._target, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            with whole():
                return attr(*args, **kwargs)

        return call
