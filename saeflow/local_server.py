"""A temporary Prefect server for one CLI command (when no PREFECT_API_URL is set) that dies with that command.

Why not Prefect's own temporary server: it is a plain child in the caller's process group, so Ctrl-C in a terminal
kills it first and the flow then retries a dead API for minutes, and a SIGKILL or SIGTERM of the caller leaves it
running (re-parented to PID 1). This one is the same server (Prefect's app under uvicorn, the same database) in a
session of its own, so the terminal's Ctrl-C reaches only saeflow, which can still close its runs through it, and it
watches the process that started it: once that is gone, however it went, the server exits.

Run as `python -m saeflow.local_server PORT PARENT_PID`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

PARENT_POLL_SECONDS = 0.5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def temporary_prefect_server(startup_timeout: float | None = None) -> Iterator[str]:
    """Start the server, point Prefect's client at it for the `with` body, stop it after; yields the API URL."""
    import httpx
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
        get_current_settings,
        temporary_settings,
    )

    port = _free_port()
    env = {
        **os.environ,
        **get_current_settings().to_environment_variables(exclude_unset=True),
        "PREFECT_UI_ENABLED": "0",
        "PREFECT__SERVER_EPHEMERAL": "1",
        "PREFECT__SERVER_FINAL": "1",
    }
    env.pop("PREFECT_API_URL", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "saeflow.local_server", str(port), str(os.getpid())],
        env=env,
        start_new_session=True,  # out of the terminal's process group: Ctrl-C is for saeflow, not for its server
    )
    url = f"http://127.0.0.1:{port}/api"
    try:
        deadline = time.monotonic() + (startup_timeout or PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value())
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the temporary Prefect server exited with code {proc.returncode} while starting")
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the temporary Prefect server did not answer at {url} in time")
            time.sleep(0.2)
        with temporary_settings(updates={PREFECT_API_URL: url}):
            try:
                yield url
            finally:
                _send_pending_logs_and_events()
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _send_pending_logs_and_events() -> None:
    """Prefect ships logs and events from background workers: let them reach the server before it stops."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        worker.drain_all(timeout=5)


def _exit_with(parent: int) -> None:
    """Linux: the kernel sends SIGTERM the moment the parent dies; everywhere: poll for a new parent as well."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_POLL_SECONDS)
        os.kill(os.getpid(), signal.SIGTERM)  # uvicorn shuts down cleanly on SIGTERM
        time.sleep(10)
        os._exit(1)

    if os.getppid() != parent:  # the parent died before we got here
        os._exit(1)
    threading.Thread(target=watch, name="watch-parent", daemon=True).start()


def main() -> None:
    port, parent = int(sys.argv[1]), int(sys.argv[2])
    _exit_with(parent)
    import uvicorn

    uvicorn.run(
        "prefect.server.api.server:create_app",
        factory=True,
        host="127.0.0.1",
        port=port,
        log_level="error",
        lifespan="on",
    )


if __name__ == "__main__":
    main()
