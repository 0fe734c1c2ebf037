"""What the CLI prints and what it keeps: Prefect's console log without tracebacks, so a failure reads as the one
`error:` line the CLI ends with, and a log file per command holding everything, tracebacks included.

`--debug` (or SAEFLOW_DEBUG=1) keeps the tracebacks on the console too. The library and the flows run under
`prefect serve` are untouched: only the `saeflow` command calls `start_logging`.
"""

from __future__ import annotations

import copy
import logging
import os
import sys
import traceback

LOG_FORMAT = "%(asctime)s | %(levelname)-7s | %(name)s - %(message)s"
DEBUG = os.environ.get("SAEFLOW_DEBUG", "") not in ("", "0", "false")
"""Show tracebacks on the console (set by `saeflow --debug`)."""
VERBOSE = os.environ.get("SAEFLOW_VERBOSE", "") not in ("", "0", "false")
"""Show the INFO chatter of the libraries underneath on the console too (set by `saeflow -v`)."""
CHATTY_LOGGERS = ("distributed", "mlflow", "alembic", "httpx", "uvicorn")
"""Loggers whose INFO records are for whoever debugs that library: the log file keeps them, the console shows
their warnings and errors only (Dask alone logged 33–35 INFO lines per run: workers starting, closing, ...)."""


_failures = logging.getLogger("saeflow.failure")
"""Where a failing command's traceback goes: the log file only (the console shows the one `error:` line)."""
_failures.propagate = False
_failures.addHandler(logging.NullHandler())


class _WithoutTraceback(logging.Formatter):
    """Formats a record as `inner` does, minus its traceback (the log file and Prefect's API keep it: the record is
    copied, not changed)."""

    def __init__(self, inner: logging.Formatter):
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        if record.exc_info or record.exc_text or record.stack_info:
            record = copy.copy(record)
            record.exc_info, record.exc_text, record.stack_info = None, None, None
        return self.inner.format(record)


class _QuietLibraries(logging.Filter):
    """Drops the INFO (and DEBUG) records of CHATTY_LOGGERS from a console handler."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING:
            return True
        return not any(record.name == n or record.name.startswith(n + ".") for n in CHATTY_LOGGERS)


class _LogFile(logging.FileHandler):
    """The log file, which stops at its first failed write: on a full or read-only disk, logging's default (a
    "--- Logging error ---" traceback on stderr for every record, which Prefect's print capture logs again) would
    bury the one line the CLI ends with."""

    failed = False

    def emit(self, record: logging.LogRecord) -> None:
        if not self.failed:
            super().emit(record)

    def handleError(self, record: logging.LogRecord) -> None:
        self.failed = True


def start_logging(command: str, root: str | None) -> str:
    """Route Prefect's and saeflow's logs: the console without tracebacks (unless DEBUG), and everything at INFO
    with tracebacks to a new log file, whose path is returned."""
    import prefect  # noqa: F401  # Prefect and MLflow configure their loggers on import; ours goes on top

    import saeflow.storage.tracking  # noqa: F401  # imports MLflow (only storage/ imports it)
    from saeflow.storage import layout

    root_logger = logging.getLogger()
    own = [logging.getLogger(name) for name in ("mlflow", "uvicorn")]  # loggers that do not propagate to root
    for logger in (root_logger, *own):
        for handler in logger.handlers:
            if not isinstance(handler, logging.StreamHandler) or isinstance(handler, logging.FileHandler):
                continue
            if not DEBUG and not isinstance(handler.formatter, _WithoutTraceback):
                handler.setFormatter(_WithoutTraceback(handler.formatter or logging.Formatter()))
            if not VERBOSE and not any(isinstance(f, _QuietLibraries) for f in handler.filters):
                handler.addFilter(_QuietLibraries())
    # MLflow draws a "Downloading artifacts" bar for every artifact it reads back (evaluate, pull, export).
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false" if not VERBOSE else "true")
    path = layout.new_log_path(command, root)
    file_handler = _LogFile(path, encoding="utf-8")
    file_handler.setLevel(logging.INFO)
    file_handler.setFormatter(logging.Formatter(LOG_FORMAT))
    for logger in (root_logger, *own, _failures):
        logger.addHandler(file_handler)
    logging.getLogger("saeflow").setLevel(logging.INFO)
    return path


def record_failure(message: str, exc: BaseException) -> None:
    """The traceback behind a command's `error:` line: into the log file, and on stderr too under --debug."""
    if DEBUG:
        traceback.print_exception(exc, file=sys.stderr)
    _failures.error("error: %s", message, exc_info=exc)
