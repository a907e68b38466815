"""/healthz and /readyz on a real gateway process, with dependencies that really go away.

Redis is a private redis-server the test stops, starts again and pauses. The
database is the test PostgreSQL reached through a TCP relay the test can cut or
turn into a black hole: to the gateway's psycopg that is what a stopped or hung
server looks like (connections refused, or accepted and never answered), without
a second server to create and migrate.
"""

import re
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from django.conf import settings
from django.db import connection

from billing.stream import usage_stream_drain
from gatewaysite.health import RESULT_REUSE_S
from tests.support.gateway import GatewayServer, gateway_server
from tests.support.processes import free_port
from tests.support.tcp_relay import relay_to_test_database, relayed_database_url

# The documented bound: a change shows in /readyz within the result reuse window
# plus the check timeout (TOLLGATE_HEALTH_TIMEOUT_SECONDS, 1 s by default).
CHECK_TIMEOUT_S = 1.0
READYZ_BOUND_S = RESULT_REUSE_S + CHECK_TIMEOUT_S
# Slack for this loaded 2-core machine (a benchmark may run beside the tests).
SCHEDULING_SLACK_S = 1.0
USAGE_LAG_S = 2.0
REDIS_PASSWORD = "redis-secret-for-health-tests"

needs_production_stack = pytest.mark.skipif(
    not settings.REDIS_URL or connection.vendor != "postgresql",
    reason="the PostgreSQL + Redis half checks the real dependencies",
)
needs_redis_server = pytest.mark.skipif(
    shutil.which("redis-server") is None, reason="redis-server is not installed"
)


# ---------------------------------------------------------------- dependencies that go away


def start_redis(port: int, directory: Path) -> subprocess.Popen[bytes]:
    """A private, password-protected redis-server on `port`, answering PING."""
    process = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", str(directory), "--requirepass", REDIS_PASSWORD],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    probe = redis.Redis(port=port, password=REDIS_PASSWORD)
    deadline = time.monotonic() + 10
    while True:
        try:
            probe.ping()
            break
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                process.kill()
                raise
            time.sleep(0.02)
    probe.close()
    return process


def stop_redis(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    process.wait(timeout=10)


# ---------------------------------------------------------------- probes


def probe(gateway: GatewayServer, path: str, **kwargs: Any) -> httpx.Response:
    return httpx.get(gateway.base_url + path, timeout=10, **kwargs)


def wait_for_readyz(gateway: GatewayServer, status_code: int, *, within_s: float) -> float:
    """Poll /readyz until it answers `status_code`; return how long that took."""
    started = time.monotonic()
    while True:
        response = probe(gateway, "/readyz")
        elapsed = time.monotonic() - started
        if response.status_code == status_code:
            return elapsed
        if elapsed > within_s:
            raise AssertionError(
                f"/readyz still {response.status_code} after {elapsed:.1f} s "
                f"(wanted {status_code}): {response.text}"
            )
        time.sleep(0.05)


def checks_of(response: httpx.Response) -> dict[str, dict[str, Any]]:
    return response.json()["checks"]


def assert_bounded(elapsed_s: float, bound_s: float) -> None:
    assert elapsed_s <= bound_s + SCHEDULING_SLACK_S, f"took {elapsed_s:.2f} s"


# ---------------------------------------------------------------- tests


@pytest.mark.django_db
def test_probes_answer_any_host_without_authentication_and_report_only_what_exists(
    tmp_path: Path,
) -> None:
    with gateway_server(TOLLGATE_VAR_DIR=str(tmp_path)) as gateway:
        # A load balancer probes each replica by IP: not a host in ALLOWED_HOSTS.
        by_ip = {"host": "10.20.30.40:8000"}
        assert probe(gateway, "/admin/login/", headers=by_ip).status_code == 400  # Django's check

        live = probe(gateway, "/healthz", headers=by_ip)
        assert (live.status_code, live.json()) == (200, {"status": "ok"})
        assert live.headers["cache-control"] == "no-store"

        ready = probe(gateway, "/readyz", headers=by_ip)
        assert ready.status_code == 200
        checks = checks_of(ready)
        expected = {"database", "redis", "usage_ingestion"} if settings.REDIS_URL else {"database"}
        assert set(checks) == expected
        for check in checks.values():
            assert check["status"] in {"ok", "degraded"}
            assert check["reason"]
            assert 0 <= check["duration_ms"] < 1000 * CHECK_TIMEOUT_S
        assert checks["database"]["status"] == "ok"
        assert ready.json()["status"] in {"ok", "degraded"}

        head = httpx.head(gateway.base_url + "/readyz", headers=by_ip)
        assert (head.status_code, head.content) == (200, b"")
        refused = httpx.post(gateway.base_url + "/healthz", content=b"{}")
        assert refused.status_code == 405
        assert refused.headers["allow"] == "GET, HEAD"


@needs_production_stack
@needs_redis_server
@pytest.mark.django_db(transaction=True)
def test_readyz_fails_within_seconds_of_redis_stopping_and_recovers_when_it_returns(
    tmp_path: Path, make_route: Any, issue_key: Any, org: Any
) -> None:
    from openai import OpenAI

    from billing.models import UsageEvent
    from tests.support.gateway import wait_for_key

    port = free_port()
    redis_url = f"redis://:{REDIS_PASSWORD}@127.0.0.1:{port}/0"
    server = start_redis(port, tmp_path)
    admin = redis.Redis(port=port, password=REDIS_PASSWORD)

    def drain_once() -> None:
        # The Celery worker's own step, run here: one read of the stream's consumer group.
        usage_stream_drain(
            consumer="health-test-worker", max_batches=5, batch_size=100,
            claim_idle_ms=60_000, client=admin, stream=settings.TOLLGATE_USAGE_STREAM,
        )  # fmt: skip

    def readyz_until(condition: Any, *, within_s: float) -> httpx.Response:
        started = time.monotonic()
        while True:
            response = probe(gateway, "/readyz")
            if condition(response):
                return response
            assert time.monotonic() - started < within_s, response.text
            time.sleep(0.05)

    try:
        with gateway_server(
            REDIS_URL=redis_url,
            TOLLGATE_VAR_DIR=str(tmp_path / "var"),
            TOLLGATE_HEALTH_USAGE_LAG_SECONDS=str(USAGE_LAG_S),
        ) as gateway:
            # No worker has ever read the usage stream: degraded, still ready.
            ready = probe(gateway, "/readyz")
            assert ready.status_code == 200
            assert ready.json()["status"] == "degraded"
            usage = checks_of(ready)["usage_ingestion"]
            assert usage == {**usage, "status": "degraded"}
            assert "no worker has read the usage stream" in usage["reason"]

            drain_once()
            ready = readyz_until(lambda r: r.json()["status"] == "ok", within_s=READYZ_BOUND_S + 1)
            assert {name: check["status"] for name, check in checks_of(ready).items()} == {
                "database": "ok", "redis": "ok", "usage_ingestion": "ok",
            }  # fmt: skip

            # An event nobody drains: degraded once it waits longer than the lag allowed.
            make_route(model="health-model", org=org)
            key = issue_key(org)
            wait_for_key(gateway, key)
            client = OpenAI(base_url=gateway.v1, api_key=key, max_retries=0)
            client.chat.completions.create(
                model="health-model", messages=[{"role": "user", "content": "hi"}]
            )
            behind = readyz_until(
                lambda r: "waiting events" in checks_of(r)["usage_ingestion"]["reason"],
                within_s=USAGE_LAG_S + READYZ_BOUND_S + SCHEDULING_SLACK_S,
            )
            assert behind.status_code == 200
            usage = checks_of(behind)["usage_ingestion"]
            assert usage["status"] == "degraded"
            # The key's /v1/models calls are metered too: every event waits for a worker.
            waiting = re.search(r"the oldest of (\d+) waiting events is \d+ s old", usage["reason"])
            assert waiting, usage["reason"]
            drain_once()
            assert UsageEvent.objects.filter(org=org).count() == int(waiting[1])
            readyz_until(lambda r: r.json()["status"] == "ok", within_s=READYZ_BOUND_S + 1)

            # Nearly full (noeviction: writes are refused when full): degraded, still ready.
            used = int(admin.info("memory")["used_memory"])
            admin.config_set("maxmemory", int(used * 1.05))
            full = readyz_until(
                lambda r: checks_of(r)["redis"]["status"] == "degraded", within_s=READYZ_BOUND_S + 1
            )
            assert full.status_code == 200
            assert re.fullmatch(
                r"memory \d+% of maxmemory used", checks_of(full)["redis"]["reason"]
            )
            admin.config_set("maxmemory", 0)

            # Redis stops: budgets fail closed, so the process is not ready.
            stop_redis(server)
            elapsed = wait_for_readyz(gateway, 503, within_s=10)
            assert_bounded(elapsed, READYZ_BOUND_S)
            down = probe(gateway, "/readyz")
            assert down.json()["status"] == "failing"
            checks = checks_of(down)
            assert checks["redis"]["status"] == "failing"
            assert checks["redis"]["reason"] == "unreachable (connection refused or closed)"
            assert checks["database"]["status"] == "ok"
            assert checks["usage_ingestion"]["status"] == "degraded"
            assert (
                "cannot be read while Redis is unreachable" in checks["usage_ingestion"]["reason"]
            )
            # Neither the URL, its password nor the host is ever served.
            for secret in (REDIS_PASSWORD, str(port), "127.0.0.1"):
                assert secret not in down.text
            assert probe(gateway, "/healthz").status_code == 200

            # Back on the same port (empty: no persistence): ready again.
            server = start_redis(port, tmp_path)
            elapsed = wait_for_readyz(gateway, 200, within_s=10)
            assert_bounded(elapsed, READYZ_BOUND_S)
            back = checks_of(probe(gateway, "/readyz"))
            assert back["redis"]["status"] == "ok"
            assert back["usage_ingestion"]["status"] == "degraded"  # its worker group went too

            # Redis hangs (every client paused): the probe still answers on time.
            admin = redis.Redis(port=port, password=REDIS_PASSWORD)
            admin.execute_command("CLIENT", "PAUSE", 4000, "ALL")
            time.sleep(RESULT_REUSE_S)
            started = time.monotonic()
            hung = probe(gateway, "/readyz")
            assert_bounded(time.monotonic() - started, CHECK_TIMEOUT_S)
            assert hung.status_code == 503
            assert checks_of(hung)["redis"]["reason"] == f"no answer within {CHECK_TIMEOUT_S:g} s"
            started = time.monotonic()
            assert probe(gateway, "/healthz").status_code == 200
            assert time.monotonic() - started < 0.5
            admin.execute_command("CLIENT", "UNPAUSE")
    finally:
        admin.close()
        stop_redis(server)


@needs_production_stack
@pytest.mark.django_db
def test_readyz_fails_naming_the_database_while_it_is_unreachable_or_hung(
    tmp_path: Path,
) -> None:
    with (
        relay_to_test_database() as relay,
        gateway_server(
            DATABASE_URL=relayed_database_url(relay), TOLLGATE_VAR_DIR=str(tmp_path)
        ) as gateway,
    ):
        assert probe(gateway, "/readyz").status_code == 200
        assert checks_of(probe(gateway, "/readyz"))["database"]["status"] == "ok"

        relay.cut()  # a stopped server: connections refused, open ones reset
        elapsed = wait_for_readyz(gateway, 503, within_s=10)
        assert_bounded(elapsed, READYZ_BOUND_S)
        down = probe(gateway, "/readyz")
        assert down.json()["status"] == "failing"
        database = checks_of(down)["database"]
        assert database["status"] == "failing"
        # Refused at once, or, when the pool was still trying to reconnect, no connection
        # within the check's timeout: both name the database as the reason.
        assert re.fullmatch(
            r"unreachable or refusing connections|no connection or answer for [\d.]+ s",
            database["reason"],
        ), database["reason"]
        assert checks_of(down)["redis"]["status"] == "ok"
        assert str(relay.port) not in down.text
        assert probe(gateway, "/healthz").status_code == 200
        # The proxy itself still answers from its in-memory configuration.
        assert probe(gateway, "/v1/models").status_code == 401

        # psycopg's pool retries with a backoff from 1 s, doubling: a short outage
        # is over within a few seconds of the database returning.
        relay.restore()
        wait_for_readyz(gateway, 200, within_s=10)

        relay.blackhole()  # a hung server: connections accepted, never answered
        time.sleep(RESULT_REUSE_S)
        # Twice: the first check may find a pooled connection reset, the second hangs.
        for _attempt in range(2):
            with ThreadPoolExecutor(max_workers=1) as background:
                started = time.monotonic()
                pending = background.submit(probe, gateway, "/readyz")
                time.sleep(0.2)
                # The check waits in a thread: the event loop keeps answering meanwhile.
                live_started = time.monotonic()
                assert probe(gateway, "/healthz").status_code == 200
                assert time.monotonic() - live_started < 0.5
                hung = pending.result()
            assert_bounded(time.monotonic() - started, CHECK_TIMEOUT_S)
            assert hung.status_code == 503
            assert checks_of(hung)["database"]["status"] == "failing"
            time.sleep(RESULT_REUSE_S)
        assert checks_of(hung)["database"]["reason"].startswith("no connection or answer for")
        relay.restore()  # lets the gateway shut down without waiting on the black hole


@needs_production_stack
@pytest.mark.django_db
def test_readyz_stays_ready_but_degraded_without_redis_when_limits_fail_open(
    tmp_path: Path,
) -> None:
    nobody_listens = f"redis://127.0.0.1:{free_port()}/0"
    with gateway_server(
        REDIS_URL=nobody_listens, TOLLGATE_LIMITS_FAIL_OPEN="true", TOLLGATE_VAR_DIR=str(tmp_path)
    ) as gateway:
        ready = probe(gateway, "/readyz")
        assert ready.status_code == 200
        assert ready.json()["status"] == "degraded"
        redis_check = checks_of(ready)["redis"]
        assert redis_check["status"] == "degraded"
        assert "budgets and rate limits are not enforced" in redis_check["reason"]
