"""Start helper processes (servers) for tests; stop them with their process group."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Final

import httpx

REPO_ROOT: Final = Path(__file__).resolve().parents[2]
_POLL_INTERVAL_S: Final = 0.05
_TERMINATE_GRACE_S: Final = 5.0
_LOG_TAIL_CHARS: Final = 4000


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _log_tail(log: IO[bytes]) -> str:
    log.flush()
    log.seek(0)
    return log.read().decode(errors="replace")[-_LOG_TAIL_CHARS:]


def _wait_ready(
    process: subprocess.Popen[bytes], ready_url: str, timeout_s: float, log: IO[bytes]
) -> None:
    """Return once `ready_url` answers < 500; raise RuntimeError on exit or timeout."""
    deadline = time.monotonic() + timeout_s
    with httpx.Client(timeout=1.0) as client:
        while True:
            if process.poll() is not None:
                raise RuntimeError(
                    f"process {process.args!r} exited with {process.returncode} before "
                    f"{ready_url} was ready; log tail:\n{_log_tail(log)}"
                )
            try:
                if client.get(ready_url).status_code < 500:
                    return
            except httpx.TransportError:
                pass  # Not listening yet.
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{ready_url} not ready after {timeout_s}s for {process.args!r}; "
                    f"log tail:\n{_log_tail(log)}"
                )
            time.sleep(_POLL_INTERVAL_S)


def stop_group(process: subprocess.Popen[bytes]) -> None:
    """Stop the process group: SIGTERM, then SIGKILL after a grace period."""
    # The process leads its own group, so its pid is the group id even after it exits.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=_TERMINATE_GRACE_S)
    # Children may outlive a leader that exited on SIGTERM, so kill the group anyway.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


@contextlib.contextmanager
def running_process(
    args: list[str],
    *,
    env: dict[str, str] | None = None,
    ready_url: str,
    timeout_s: float = 30,
    cwd: Path | str | None = None,
) -> Iterator[subprocess.Popen[bytes]]:
    """Run `args` in its own process group for the block, once `ready_url` answers.

    Output goes to a temporary log whose tail is included in the RuntimeError raised
    when the process dies or is not ready within `timeout_s`.
    """
    with tempfile.TemporaryFile(prefix="tollgate-proc-") as log:
        process = subprocess.Popen(
            args,
            env=env,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            _wait_ready(process, ready_url, timeout_s, log)
            yield process
        finally:
            stop_group(process)


def _flag(name: str, value: object) -> list[str]:
    flag = "--" + name.replace("_", "-")
    return [flag, "none" if value is None else str(value)]


@contextlib.contextmanager
def mock_provider(**defaults: object) -> Iterator[str]:
    """Run the mock provider on a free port and yield its base URL ending in /v1.

    Keyword arguments become its command-line defaults (`ttft_ms=50` → `--ttft-ms 50`).
    """
    port = free_port()
    args = [
        sys.executable,
        "-m",
        "routing.mockprovider",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    for name, value in defaults.items():
        args += _flag(name, value)
    root = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with running_process(args, env=env, ready_url=f"{root}/_mock/health", cwd=REPO_ROOT):
        yield f"{root}/v1"
