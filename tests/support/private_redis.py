"""A private redis-server a test may stop, restart and hang, and usage ingestion against it.

The shared Redis of the test run must never be stopped: tests of Redis outages run
the gateway (and its Celery worker) against one of these instead.
"""

import os
import signal
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import redis

from tests.support.gateway import celery_process, database_env, wait_until
from tests.support.processes import free_port


class PrivateRedis:
    """A redis-server on a port of its own, without persistence (a restart loses all)."""

    def __init__(self, directory: Path, *, password: str | None = None) -> None:
        self.port = free_port()
        self.directory = directory
        self.password = password
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, password=self.password, socket_timeout=5)

    def start(self) -> None:
        """Start (or start again, on the same port, empty) and wait until it answers."""
        assert self.process is None, "already running"
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.directory),
             # DEBUG SLEEP, from this machine only: how a test makes Redis hang briefly.
             "--enable-debug-command", "local",
             *(["--requirepass", self.password] if self.password else [])],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        probe = redis.Redis(port=self.port, password=self.password, socket_timeout=1)
        try:
            wait_until(self._answers(probe), timeout_s=10, what="the private redis-server")
        finally:
            probe.close()

    @staticmethod
    def _answers(probe: redis.Redis) -> Callable[[], bool]:
        def check() -> bool:
            try:
                return bool(probe.ping())
            except redis.ConnectionError:
                return False

        return check

    def stop(self) -> None:
        """Stop it: new connections are refused, open ones are closed."""
        if self.process is None:
            return
        self.resume()  # a stopped process cannot handle SIGTERM
        self.process.terminate()
        self.process.wait(timeout=10)
        self.process = None

    def hang(self) -> None:
        """Freeze the server (SIGSTOP): connections stay open and nothing answers."""
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        if self.process is not None:
            os.kill(self.process.pid, signal.SIGCONT)


@contextmanager
def private_redis(*, password: str | None = None) -> Iterator[PrivateRedis]:
    with tempfile.TemporaryDirectory(prefix="tollgate-private-redis-") as directory:
        server = PrivateRedis(Path(directory), password=password)
        server.start()
        try:
            yield server
        finally:
            server.stop()


@contextmanager
def usage_ingestion_at(redis_url: str, **extra_env: str) -> Iterator[None]:
    """A real Celery worker with beat, draining the usage stream of `redis_url` (its broker
    too) into the test database, as production runs it. It rides out Redis outages."""
    env = {
        **os.environ,
        **database_env(),
        "REDIS_URL": redis_url,
        "TOLLGATE_USAGE_DRAIN_SECONDS": "0.5",
        **extra_env,
    }
    with tempfile.TemporaryDirectory(prefix="tollgate-beat-") as beat_dir:
        args = ["worker", "--beat", "--schedule", f"{beat_dir}/schedule",
                "--concurrency", "1", "--loglevel", "WARNING"]  # fmt: skip
        with celery_process(*args, env=env):
            yield
