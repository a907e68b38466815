"""A real Tollgate server for end-to-end tests, plus helpers to wait on it."""

import asyncio
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import quote

import httpx
import openai
import redis
from django.conf import settings
from django.db import connection

from gatewaysite.http_server import HTTP_PROTOCOL
from tests.support.processes import REPO_ROOT, free_port, running_process, stop_group

T = TypeVar("T")

# Small limits so the tests can reach them cheaply.
TEST_MAX_REQUEST_BYTES = 256 * 1024
TEST_BREAKER_FAILURES = 3
TEST_BREAKER_COOLDOWN_S = 1.5
# Budget alerts checked every second, to webhook receivers the tests run on 127.0.0.1.
ALERTS_ENV = {
    "TOLLGATE_ALERT_CHECK_SECONDS": "1",
    "TOLLGATE_WEBHOOK_ALLOW_PRIVATE_NETWORKS": "true",
}
# The mock provider listens on loopback, which the gateway refuses to call (server-side
# request forgery, routing/providers/egress.py) unless the operator allows it.
LOOPBACK_PROVIDERS_ENV = {"TOLLGATE_PROVIDER_ALLOW_PRIVATE_NETWORKS": "true"}


@dataclass(frozen=True)
class GatewayServer:
    base_url: str  # e.g. http://127.0.0.1:PORT

    @property
    def v1(self) -> str:
        return self.base_url + "/v1"


def database_env() -> dict[str, str]:
    """Point a server process at the test database.

    Call it from a test marked django_db: only then has pytest-django created
    the test database and renamed the connection to it.
    """
    database = connection.settings_dict
    test_name = database["NAME"]
    if database["ENGINE"] == "django.db.backends.sqlite3":
        return {"TOLLGATE_SQLITE_PATH": str(test_name)}
    credentials = quote(database["USER"] or "")
    if database.get("PASSWORD"):
        credentials += ":" + quote(database["PASSWORD"])
    host = database["HOST"] or "127.0.0.1"
    port = database["PORT"] or "5432"
    return {"DATABASE_URL": f"postgres://{credentials}@{host}:{port}/{test_name}"}


@contextmanager
def gateway_server(**extra_env: str) -> Iterator[GatewayServer]:
    """Run uvicorn with Tollgate's ASGI application against the test database."""
    port = free_port()
    env = {
        **os.environ,
        **database_env(),
        "PYTHONUNBUFFERED": "1",
        "TOLLGATE_CONFIG_POLL_SECONDS": "0.05",
        "TOLLGATE_USAGE_FLUSH_SECONDS": "0.05",
        "TOLLGATE_MAX_REQUEST_BYTES": str(TEST_MAX_REQUEST_BYTES),
        # Breakers that open and cool down within a test's time.
        "TOLLGATE_BREAKER_FAILURES": str(TEST_BREAKER_FAILURES),
        "TOLLGATE_BREAKER_COOLDOWN_SECONDS": str(TEST_BREAKER_COOLDOWN_S),
        "TOLLGATE_LATENCY_HALF_LIFE_SECONDS": "2",
        # The embedded default checks budget alerts itself; receivers run on loopback.
        **ALERTS_ENV,
        **LOOPBACK_PROVIDERS_ENV,
        **extra_env,
    }
    args = [
        sys.executable, "-m", "uvicorn", "gatewaysite.asgi:application",
        "--host", "127.0.0.1", "--port", str(port), "--no-access-log", "--http", HTTP_PROTOCOL,
    ]  # fmt: skip
    base_url = f"http://127.0.0.1:{port}"
    with running_process(args, env=env, ready_url=f"{base_url}/v1/models", cwd=REPO_ROOT):
        yield GatewayServer(base_url=base_url)


@contextmanager
def celery_process(*args: str, env: dict[str, str]) -> Iterator[subprocess.Popen[bytes]]:
    """Run `celery -A gatewaysite ARGS` in its own process group for the block.

    Celery serves no URL to wait on: callers wait for what the process does.
    """
    with tempfile.TemporaryFile(prefix="tollgate-celery-") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "gatewaysite", *args],
            env={"PYTHONUNBUFFERED": "1", **env},
            cwd=REPO_ROOT,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            yield process
        finally:
            stop_group(process)


@contextmanager
def usage_ingestion() -> Iterator[None]:
    """With Redis, a real Celery worker and beat drain the usage stream into the test
    database, as in production; without it the gateway writes usage itself."""
    from billing.stream import USAGE_GROUP

    if not settings.REDIS_URL:
        yield
        return
    stream = settings.TOLLGATE_USAGE_STREAM
    client = redis.Redis.from_url(settings.REDIS_URL)
    client.delete(stream)  # entries of an earlier session point at rows that are gone
    env = {
        **os.environ, **database_env(), "TOLLGATE_USAGE_DRAIN_SECONDS": "1",
        "TOLLGATE_WEBHOOK_ALLOW_PRIVATE_NETWORKS": "true",
    }  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="tollgate-beat-") as beat_dir:
        worker_args = ["worker", "--beat", "--schedule", f"{beat_dir}/schedule",
                       "--concurrency", "1", "--loglevel", "WARNING"]  # fmt: skip
        with celery_process(*worker_args, env=env):

            def draining() -> bool:
                try:
                    return bool(client.xinfo_consumers(stream, USAGE_GROUP))
                except redis.ResponseError:
                    return False  # no stream or group yet

            wait_until(draining, timeout_s=60, what="the Celery worker to drain usage")
            yield
    client.close()


def wait_until(check: Callable[[], T], *, timeout_s: float = 10.0, what: str = "condition") -> T:
    """Poll `check` until it returns something truthy; fail the test after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"Timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.02)


def wait_for_key(gateway: GatewayServer, plaintext: str) -> None:
    """Wait until the server's snapshot accepts `plaintext` (new keys take one poll)."""

    def accepted() -> bool:
        response = httpx.get(
            f"{gateway.v1}/models", headers={"authorization": f"Bearer {plaintext}"}
        )
        return response.status_code == 200

    wait_until(accepted, what="the gateway to accept the new key")


def wait_for_config(gateway: GatewayServer, plaintext: str, model: str) -> None:
    """Wait until the server lists `model` for this key (routes take one poll)."""

    def listed() -> bool:
        response = httpx.get(
            f"{gateway.v1}/models", headers={"authorization": f"Bearer {plaintext}"}
        )
        return response.status_code == 200 and any(
            item["id"] == model for item in response.json()["data"]
        )

    wait_until(listed, what=f"the gateway to route {model}")


def wait_for_events(queryset: Any, count: int) -> list[Any]:
    """Wait until `queryset` holds at least `count` usage events and return them."""
    wait_until(lambda: queryset.count() >= count, what=f"{count} usage event(s)")
    return list(queryset)


def wait_for_usage_writes_to_settle(*, quiet_s: float = 0.25, timeout_s: float = 10.0) -> None:
    """Wait until no usage event has arrived for `quiet_s` (several flush intervals)
    and, with Redis, the usage stream has been drained."""
    from billing.models import UsageEvent

    client = redis.Redis.from_url(settings.REDIS_URL) if settings.REDIS_URL else None
    deadline = time.monotonic() + timeout_s
    last_count, last_change = -1, time.monotonic()
    while time.monotonic() < deadline:
        count = UsageEvent.objects.count()
        if count != last_count:
            last_count, last_change = count, time.monotonic()
        elif time.monotonic() - last_change >= quiet_s and (
            client is None or client.xlen(settings.TOLLGATE_USAGE_STREAM) == 0
        ):
            break
        time.sleep(0.05)
    if client is not None:
        client.close()


async def chat_burst(
    bases: list[str], key: str, *, model: str, max_tokens: int, count: int
) -> list[str]:
    """`count` concurrent chat requests, round-robin over the gateways' /v1 base URLs:
    "ok" or the error code of each."""
    clients = [openai.AsyncOpenAI(base_url=base, api_key=key, max_retries=0) for base in bases]

    async def one(index: int) -> str:
        try:
            await clients[index % len(clients)].chat.completions.create(
                model=model, messages=[{"role": "user", "content": "Hello"}],
                max_tokens=max_tokens,
            )  # fmt: skip
        except openai.APIStatusError as exc:
            return str(exc.code)
        return "ok"

    try:
        return await asyncio.gather(*(one(index) for index in range(count)))
    finally:
        for client in clients:
            await client.close()
