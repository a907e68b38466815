"""The fault matrix, process half: PostgreSQL restarting, the Celery worker or a web worker
killed, and a load run with faults injected, each against a real stack.

The stack is the production one without Docker: uvicorn with two web workers, a Celery
worker and beat, on a private redis-server and the test PostgreSQL. The web workers and
the Celery worker reach PostgreSQL through a TCP relay (tests/support/tcp_relay.py):
cutting it is what a PostgreSQL restart looks like to them (every connection reset, new
ones refused for a few seconds), without touching the server the rest of the run shares.
The clients are the official openai SDK. Each case checks what the client gets, that
every request it sent is in the ledger exactly once (event ids against the x-request-id
of every request), and that each hard budget's counter equals the ledger, with nothing
left reserved and nothing over the limit. docs/reliability.md tables it.
"""

import asyncio
import contextlib
import itertools
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import httpx2
import openai
import pytest
import redis
import redis.asyncio
from django.conf import settings
from django.db import connection, transaction
from openai import AsyncOpenAI, OpenAI

from billing.budget_leases import LEASE_IDLE_S
from billing.models import ModelPrice, UsageEvent
from billing.stream import (
    USAGE_GROUP,
    UsageStreamProducer,
    usage_record_decode,
    usage_stream_async_client,
)
from gatewaysite.http_server import HTTP_PROTOCOL
from routing.models import Deployment, Provider, Route
from routing.proxy.limits import HOLD_MARGIN_S
from tenants.models import Organization, VirtualKey
from tenants.services import virtual_key_issue
from tests.billing.test_stream import make_record
from tests.conftest import TEST_ACTOR
from tests.factories import OrganizationFactory
from tests.support.gateway import (
    GatewayServer,
    celery_process,
    database_env,
    wait_until,
)
from tests.support.halves import needs_redis_server, production_half_only
from tests.support.private_redis import PrivateRedis, private_redis
from tests.support.processes import REPO_ROOT, free_port, running_process
from tests.support.tcp_relay import TcpRelay, relay_to_test_database, relayed_database_url

pytestmark = [
    pytest.mark.django_db(transaction=True),
    production_half_only,  # the production-like stack loses its processes
    needs_redis_server,
]

HELLO = [{"role": "user", "content": "Hello"}]
# USD per million tokens: 1,000 nano-USD an input token, 10,000 an output token.
PRICE = (Decimal("1.00"), Decimal("10.00"))
MAX_TOKENS = 16
# Tight deployment timeouts, so the hang faults cost well under a second each.
FAST = {"ttft_timeout_ms": 300, "read_timeout_ms": 400, "total_timeout_ms": 1_500}
# Entries a dead Celery worker held are claimed by another after this long idle
# (TOLLGATE_USAGE_CLAIM_IDLE_SECONDS: 60 s by default, 2 s here).
CLAIM_IDLE_S = 2.0
DRAIN_S = 0.5  # TOLLGATE_USAGE_DRAIN_SECONDS: beat starts a drain this often
# How long PostgreSQL stays away when the relay is cut: a quick restart.
RESTART_S = 3.0
# The longest the ledger may take to catch up after a fault, on this loaded machine.
CATCH_UP_S = 60.0
LIVE_S = 2.0  # TOLLGATE_PROCESS_LIVE_SECONDS of the web workers
LEASE_RETURN_SLACK_S = 2.0  # the lease keeper's round and a busy machine


# ---------------------------------------------------------------- the stack


@dataclass
class Stack:
    """Web (uvicorn, two workers), beat, and Celery workers the test starts and kills."""

    gateway: GatewayServer
    web: subprocess.Popen[bytes]  # the uvicorn supervisor
    redis: PrivateRedis
    relay: TcpRelay
    worker_env: dict[str, str]
    spool_dir: Path
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)
    _exits: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)

    def start_worker(self) -> subprocess.Popen[bytes]:
        """A production Celery worker (concurrency 1) draining the usage stream."""
        args = ["worker", "--concurrency", "1", "--loglevel", "WARNING"]
        worker = self._exits.enter_context(celery_process(*args, env=self.worker_env))
        self.workers.append(worker)
        return worker

    def worker(self) -> subprocess.Popen[bytes]:
        """The running worker (started if none runs): tests that kill none share one."""
        alive = [worker for worker in self.workers if worker.poll() is None]
        return alive[-1] if alive else self.start_worker()

    def kill_worker(self, worker: subprocess.Popen[bytes]) -> None:
        """SIGKILL the worker and its pool at once: no shutdown, no acknowledgement."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(worker.pid, signal.SIGKILL)
        worker.wait()

    def stop_workers(self) -> None:
        self._exits.close()
        self.workers.clear()

    def redis_client(self) -> redis.Redis:
        return redis.Redis.from_url(self.redis.url)

    def web_workers(self) -> list[int]:
        """The pids of uvicorn's web workers (its children but multiprocessing's tracker)."""
        path = Path(f"/proc/{self.web.pid}/task/{self.web.pid}/children")
        workers = []
        for pid in path.read_text().split():
            with contextlib.suppress(OSError):  # gone meanwhile
                if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    workers.append(int(pid))
        return workers


@contextlib.contextmanager
def web_server(env: dict[str, str], *, workers: int) -> Iterator[tuple[GatewayServer, Any]]:
    """uvicorn with Tollgate's ASGI application and several workers, as bin/run-process runs it."""
    port = free_port()
    args = [
        sys.executable, "-m", "uvicorn", "gatewaysite.asgi:application", "--host", "127.0.0.1",
        "--port", str(port), "--workers", str(workers), "--no-access-log", "--http", HTTP_PROTOCOL,
    ]  # fmt: skip
    base_url = f"http://127.0.0.1:{port}"
    with running_process(
        args, env=env, ready_url=f"{base_url}/v1/models", timeout_s=60, cwd=REPO_ROOT
    ) as process:
        yield GatewayServer(base_url=base_url), process


@pytest.fixture(scope="module")
def stack(
    django_db_setup: None, mock_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    var_dir = tmp_path_factory.mktemp("proc-faults")
    with contextlib.ExitStack() as exits:
        server = exits.enter_context(private_redis())
        relay = exits.enter_context(relay_to_test_database())
        env = {
            **os.environ,
            **database_env(),
            "DATABASE_URL": relayed_database_url(relay),
            "REDIS_URL": server.url,
            "TOLLGATE_VAR_DIR": str(var_dir),
            "PYTHONUNBUFFERED": "1",
            "LOG_LEVEL": "WARNING",
            "TOLLGATE_USAGE_DRAIN_SECONDS": str(DRAIN_S),
            "TOLLGATE_USAGE_CLAIM_IDLE_SECONDS": str(CLAIM_IDLE_S),
        }
        web_env = {
            **env,
            "TOLLGATE_CONFIG_POLL_SECONDS": "0.05",
            "TOLLGATE_USAGE_FLUSH_SECONDS": "0.05",
            "TOLLGATE_BREAKER_FAILURES": "3",
            "TOLLGATE_BREAKER_COOLDOWN_SECONDS": "1.5",
            # A killed web worker is taken for dead this soon (billing/inflight.py).
            "TOLLGATE_PROCESS_LIVE_SECONDS": str(LIVE_S),
            # The mock provider listens on loopback.
            "TOLLGATE_PROVIDER_ALLOW_PRIVATE_NETWORKS": "true",
        }
        gateway, web = exits.enter_context(web_server(web_env, workers=2))
        beat_args = ["beat", "--schedule", str(var_dir / "beat-schedule"), "--loglevel", "WARNING"]
        exits.enter_context(celery_process(*beat_args, env=env))
        stack = Stack(
            gateway=gateway, web=web, redis=server, relay=relay, worker_env=env,
            spool_dir=var_dir / "test-spool",
        )  # fmt: skip
        exits.callback(stack.stop_workers)
        yield stack


@pytest.fixture
def procs(stack: Stack) -> Iterator[Stack]:
    """The stack, its relay forwarding again after the test. Each test waits until the
    worker has written all its usage, so the worker may stay for the next one."""
    yield stack
    if stack.relay.mode != "forward":
        stack.relay.restore()


# ---------------------------------------------------------------- tenants, routes, keys


def add_route(
    mock_url: str, org: Organization, model: str, *deployments: tuple[str, dict[str, Any]],
    **route_fields: Any,
) -> None:  # fmt: skip
    """Route `model` of `org` over (upstream model with mock directives, deployment fields),
    tried in that order; each upstream model priced at PRICE."""
    with transaction.atomic():
        provider = Provider(name=f"mock for {model}", kind=Provider.Kind.MOCK, base_url=mock_url)
        provider.set_api_key("sk-upstream-secret-for-process-faults")
        provider.save()
        route = Route.objects.create(org=org, model_name=model, **route_fields)
        for priority, (upstream, fields) in enumerate(deployments):
            route.deployments.add(
                Deployment.objects.create(
                    provider=provider, name=f"{model}-{priority}", upstream_model=upstream,
                    priority=priority, **fields,
                )
            )  # fmt: skip
            ModelPrice.objects.get_or_create(
                provider_kind=Provider.Kind.MOCK, model=upstream,
                defaults={"input_usd_per_mtok": PRICE[0], "output_usd_per_mtok": PRICE[1],
                          "effective_from": datetime(2020, 1, 1, tzinfo=UTC)},
            )  # fmt: skip


@dataclass(frozen=True)
class Key:
    plaintext: str
    key: VirtualKey
    limit_nanos: int


def issue(org: Organization, name: str, *, budget_nanos: int) -> Key:
    """A key with a hard monthly budget of its own."""
    issued = virtual_key_issue(
        org=org, name=name, actor=TEST_ACTOR, monthly_budget_nanos=budget_nanos
    )
    return Key(issued.plaintext, issued.key, budget_nanos)


def wait_for_routes(stack: Stack, key: Key, *models: str) -> None:
    """Every web worker serves the key and its routes. The workers share one listening
    socket, so fresh connections are made until each worker has answered one listing
    every model (a worker's configuration only moves forward)."""
    ready: set[int] = set()

    def every_worker_lists_them() -> bool:
        with httpx.Client(base_url=stack.gateway.v1, timeout=10) as client:
            response = client.get("/models", headers={"authorization": f"Bearer {key.plaintext}"})
            listed = response.status_code == 200 and set(models) <= {
                item["id"] for item in response.json()["data"]
            }
            if listed:
                _host, port = response.extensions["network_stream"].get_extra_info("client_addr")
                ready.add(serving_worker(stack, port))
        return ready >= set(stack.web_workers())

    wait_until(every_worker_lists_them, timeout_s=30, what=f"every web worker to route {models}")


# ---------------------------------------------------------------- traffic


@dataclass(frozen=True)
class Sent:
    """One request and what its client got."""

    request_id: str  # "" only when no answer came at all
    key: str
    model: str
    stream: bool
    status: int  # the HTTP status; 0 when the connection dropped before any
    code: str  # the error code (a stream's error event included); "" on success
    started: float  # monotonic


async def ask(client: AsyncOpenAI, model: str, *, stream: bool) -> tuple[str, int, str]:
    """One chat request: its x-request-id, status and error code."""
    request_id = ""
    try:
        if stream:
            chunks = await client.chat.completions.create(
                model=model, messages=HELLO, max_tokens=MAX_TOKENS, stream=True
            )
            request_id = chunks.response.headers["x-request-id"]
            try:
                async for _chunk in chunks:
                    pass
            except openai.APIError as exc:  # the stream's final error event
                return request_id, 200, str(exc.code)
            return request_id, 200, ""
        raw = await client.chat.completions.with_raw_response.create(
            model=model, messages=HELLO, max_tokens=MAX_TOKENS
        )
        assert raw.parse().choices[0].message.content
        return raw.headers["x-request-id"], raw.status_code, ""
    except openai.APIStatusError as exc:
        body = exc.response.json()
        assert set(body["error"]) >= {"message", "type", "param", "code"}, body
        return exc.response.headers["x-request-id"], exc.status_code, str(exc.code)
    except (openai.APIConnectionError, httpx2.TransportError):
        return request_id, 0, "connection_dropped"


Pick = Callable[[int], tuple[Key, str, bool]]  # the n-th request: (key, model, stream)


class Traffic:
    """Chat requests through AsyncOpenAI, `concurrency` at a time, from a thread of its own
    until stopped, while the test injects faults."""

    def __init__(self, gateway: GatewayServer, pick: Pick, *, concurrency: int) -> None:
        self._gateway = gateway
        self._pick = pick
        self._concurrency = concurrency
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._sent: list[Sent] = []
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)
        self._failure: BaseException | None = None

    def __enter__(self) -> "Traffic":
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def sent(self) -> list[Sent]:
        with self._lock:
            return list(self._sent)

    def wait_for(self, count: int, *, timeout_s: float = 30) -> None:
        wait_until(lambda: len(self.sent) >= count, timeout_s=timeout_s, what=f"{count} requests")

    def stop(self) -> list[Sent]:
        self._stop.set()
        self._thread.join(timeout=60)
        assert not self._thread.is_alive(), "the traffic did not stop"
        if self._failure is not None:
            raise self._failure
        return self.sent

    async def _run(self) -> None:
        counter = itertools.count()
        clients: dict[str, AsyncOpenAI] = {}

        async def sender() -> None:
            while not self._stop.is_set():
                key, model, stream = self._pick(next(counter))
                client = clients.get(key.plaintext)
                if client is None:
                    client = clients[key.plaintext] = AsyncOpenAI(
                        base_url=self._gateway.v1, api_key=key.plaintext, max_retries=0,
                        timeout=30,
                    )  # fmt: skip
                started = time.monotonic()
                request_id, status, code = await ask(client, model, stream=stream)
                with self._lock:
                    self._sent.append(
                        Sent(request_id, key.plaintext, model, stream, status, code, started)
                    )

        try:
            await asyncio.gather(*(sender() for _ in range(self._concurrency)))
        except BaseException as exc:  # surfaced by stop()
            self._failure = exc
        finally:
            for client in clients.values():
                await client.close()


# ---------------------------------------------------------------- the ledger and budgets


def wait_for_ledger(request_ids: Collection[str], *, orgs: Collection[Organization]) -> None:
    """Every request sent is in the ledger, exactly once, and nothing else is."""
    expected = set(request_ids)
    assert len(expected) == len(request_ids), "x-request-id repeated"
    rows = UsageEvent.objects.filter(org__in=list(orgs), endpoint="chat.completions")

    def ledger() -> set[str]:
        return {event_id.hex for event_id in rows.values_list("id", flat=True)}

    deadline = time.monotonic() + CATCH_UP_S
    while (found := ledger()) != expected and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(2 * DRAIN_S)  # a late duplicate or stray event would land by now
    found = ledger()
    assert found == expected, (
        f"{len(expected - found)} request(s) missing from the ledger, "
        f"{len(found - expected)} event(s) no request of the test made"
    )
    assert rows.count() == len(expected)


def key_budget(gateway: GatewayServer, key: Key) -> dict[str, Any]:
    response = httpx.get(
        f"{gateway.v1}/key/info", headers={"authorization": f"Bearer {key.plaintext}"}, timeout=10
    )
    assert response.status_code == 200, response.text
    (budget,) = response.json()["budgets"]
    return budget


def assert_budget_equals_ledger(gateway: GatewayServer, key: Key) -> int:
    """The key's hard budget: its counter holds what the ledger holds, nothing is left
    reserved, and the spend is within the limit. Returns the spend.

    A busy key's requests are admitted from a lease, whose room stays reserved until the
    key has been quiet for LEASE_IDLE_S (billing/budget_leases.py): only a hold still
    there after that, and a little slack, outlived its request."""
    spent = sum(UsageEvent.objects.filter(key=key.key).values_list("cost_nanos", flat=True))
    deadline = time.monotonic() + LEASE_IDLE_S + LEASE_RETURN_SLACK_S
    while Decimal((budget := key_budget(gateway, key))["reserved_usd"]) and (
        time.monotonic() < deadline
    ):
        time.sleep(0.1)
    assert Decimal(budget["spent_usd"]).scaleb(9) == spent
    assert Decimal(budget["reserved_usd"]) == 0, "a hold outlived its request"
    assert spent <= key.limit_nanos
    return spent


def answered_ids(sent: Collection[Sent]) -> list[str]:
    assert all(s.request_id for s in sent), "a request got no answer at all"
    return [s.request_id for s in sent]


# ---------------------------------------------------------------- PostgreSQL restarts


def test_postgres_restarting_during_traffic_serves_every_request_and_ingestion_catches_up(
    procs: Stack, org: Organization, mock_url: str
) -> None:
    """The hot path needs no database: while PostgreSQL restarts, every request is served
    from the in-memory configuration and its usage waits in the Redis stream; the Celery
    worker's drains fail, and once the database is back they write every event, once."""
    add_route(mock_url, org, "r", ("m", {}))
    key = issue(org, "restart", budget_nanos=1_000_000_000)
    wait_for_routes(procs, key, "r")
    procs.worker()

    with Traffic(procs.gateway, lambda n: (key, "r", n % 2 == 0), concurrency=4) as traffic:
        traffic.wait_for(20)
        procs.relay.cut()
        cut_at = time.monotonic()
        time.sleep(RESTART_S)
        # Nothing sent while the database was away has reached the ledger.
        during = [s for s in traffic.sent if s.started > cut_at + 0.5]
        assert during, "no request was sent while the database was away"
        assert not UsageEvent.objects.filter(id__in=[s.request_id for s in during]).exists()
        procs.relay.restore()
        time.sleep(1.0)
    sent = traffic.sent

    assert {(s.status, s.code) for s in sent} == {(200, "")}
    wait_for_ledger(answered_ids(sent), orgs=[org])
    assert_budget_equals_ledger(procs.gateway, key)


def batch_in_flight() -> tuple[int, int] | None:
    """(backend pid, transaction id) of a ledger batch being written right now, if any."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT pid, backend_xid::text::bigint FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            " AND backend_xid IS NOT NULL AND query LIKE %s",
            # Any statement of the write (staging table, COPY, INSERT … SELECT, DROP).
            ['%"billing_usageevent%'],
        )
        row = cursor.fetchone()
    return (row[0], row[1]) if row else None


def transaction_status(xid: int) -> str:
    """ "in progress", "committed" or "aborted" (the xid in the current epoch)."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT pg_xact_status((((pg_snapshot_xmax(pg_current_snapshot())::text::bigint"
            " >> 32) << 32) + %s)::text::xid8)",
            [xid],
        )
        return cursor.fetchone()[0]


def test_postgres_restarting_mid_batch_loses_nothing_and_counts_nothing_twice(
    procs: Stack, org: Organization, mock_url: str
) -> None:
    """PostgreSQL goes away while the worker writes a batch of a large backlog: the batch's
    transaction is rolled back, its entries stay unacknowledged in the stream, and the
    worker writes them again once the database is back; nothing lost, nothing twice."""
    add_route(mock_url, org, "r", ("m", {}))
    key = issue(org, "backlog", budget_nanos=1_000_000_000)
    wait_for_routes(procs, key, "r")
    # The backlog: 200 requests' events, and 6,000 more appended straight to the stream.
    with Traffic(procs.gateway, lambda n: (key, "r", n % 2 == 0), concurrency=8) as traffic:
        traffic.wait_for(200)
    sent = traffic.sent
    assert {(s.status, s.code) for s in sent} == {(200, "")}
    other = OrganizationFactory()
    backlog = [make_record(org_id=other.pk, cost_nanos=1_000 + n) for n in range(6_000)]

    async def append() -> None:
        producer = UsageStreamProducer(
            client=usage_stream_async_client(procs.redis.url),
            stream=settings.TOLLGATE_USAGE_STREAM, spool_dir=procs.spool_dir,
            flush_interval_s=0.05, batch_size=500,
        )  # fmt: skip
        for record in backlog:
            producer.add(record)
        assert await producer.flush()
        await producer.aclose()

    asyncio.run(append())

    procs.worker()
    # Cut while a batch's transaction is open; should its COMMIT slip through first, try
    # again on a later batch.
    for _attempt in range(5):
        pid, xid = wait_until(batch_in_flight, timeout_s=30, what="a ledger batch being written")
        procs.relay.cut()
        status = wait_until(
            lambda xid=xid: (s := transaction_status(xid)) != "in progress" and s,
            timeout_s=10, what="the cut batch's transaction to end",
        )  # fmt: skip
        time.sleep(RESTART_S)
        procs.relay.restore()
        if status == "aborted":
            break
    assert status == "aborted", "every cut landed after a batch's commit"
    assert UsageEvent.objects.filter(org=other).count() < len(backlog)

    wait_for_ledger(
        answered_ids(sent) + [record.event_id.hex for record in backlog], orgs=[org, other]
    )
    assert sum(UsageEvent.objects.filter(org=other).values_list("cost_nanos", flat=True)) == sum(
        record.cost_nanos for record in backlog
    )
    assert_budget_equals_ledger(procs.gateway, key)
    # Nothing left unacknowledged (metered calls of /v1/key/info may be in flight).
    client = procs.redis_client()
    wait_until(lambda: pending_entries(client) == 0, what="every entry acknowledged")
    client.close()


# ---------------------------------------------------------------- the Celery worker killed


def pending_entries(client: redis.Redis) -> int:
    """Usage stream entries delivered to a worker and not acknowledged yet."""
    try:
        return int(client.xpending(settings.TOLLGATE_USAGE_STREAM, USAGE_GROUP)["pending"])
    except redis.ResponseError:
        return 0  # no group yet: no worker has read the stream


def test_a_celery_worker_killed_mid_batch_under_live_traffic_loses_nothing(
    procs: Stack, org: Organization, mock_url: str
) -> None:
    """SIGKILL while the worker holds a batch (read from the stream, not acknowledged) and the
    gateway keeps producing: a new worker claims the dead one's entries once they have been
    idle TOLLGATE_USAGE_CLAIM_IDLE_SECONDS, and ingests everything, once."""
    add_route(mock_url, org, "r", ("m", {}))
    key = issue(org, "worker", budget_nanos=1_000_000_000)
    wait_for_routes(procs, key, "r")
    stream = settings.TOLLGATE_USAGE_STREAM
    client = procs.redis_client()

    def pending() -> int:
        return pending_entries(client)

    with Traffic(procs.gateway, lambda n: (key, "r", n % 3 == 0), concurrency=4) as traffic:
        traffic.wait_for(10)
        # Kill it while it holds entries; if it acknowledged them first, another try.
        for _attempt in range(5):
            worker = procs.worker()
            wait_until(pending, timeout_s=60, what="the worker to hold a batch")
            procs.kill_worker(worker)
            held = client.xpending_range(stream, USAGE_GROUP, "-", "+", count=100_000)
            if held:
                break
        assert held, "the worker never died holding a batch"
        dead = {entry["consumer"] for entry in held}
        held_events = {
            usage_record_decode(client.xrange(stream, e["message_id"], e["message_id"])[0][1])
            for e in held
        }
        produced_while_down = len(traffic.sent)
        time.sleep(1.0)
        assert len(traffic.sent) > produced_while_down, "the gateway kept serving"
        procs.start_worker()

        def claimed() -> bool:
            consumers = client.xinfo_consumers(stream, USAGE_GROUP)
            return all(c["pending"] == 0 for c in consumers if c["name"] in dead)

        wait_until(claimed, timeout_s=30, what="the dead worker's entries to be claimed")
        time.sleep(0.5)
    sent = traffic.sent

    assert {(s.status, s.code) for s in sent} == {(200, "")}
    wait_for_ledger(answered_ids(sent), orgs=[org])
    assert {record.event_id for record in held_events} <= set(
        UsageEvent.objects.filter(org=org).values_list("id", flat=True)
    )
    assert_budget_equals_ledger(procs.gateway, key)
    wait_until(lambda: pending() == 0, what="every entry acknowledged")
    client.close()


# ---------------------------------------------------------------- a web worker killed mid-stream

LONG_WORDS = 40  # a stream of 40 words, one every 100 ms: four seconds
LONG = (f"long+tokens={LONG_WORDS}+chunk_delay_ms=100", {"total_timeout_ms": 10_000})
LONG_DEADLINE_MS = 5_000
# A hold outlives its request by the route's deadline, the slowest deployment's total
# timeout and a margin (routing/proxy/limits.py hold_ttl_s): 5 + 10 + 60 s here.
LONG_HOLD_TTL_S = LONG_DEADLINE_MS / 1000 + LONG[1]["total_timeout_ms"] / 1000 + HOLD_MARGIN_S


def serving_worker(stack: Stack, client_port: int) -> int:
    """The web worker holding the server end of the client's connection from `client_port`."""
    server_port = int(stack.gateway.base_url.rsplit(":", 1)[1])
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local_port, remote_port = (int(f.rsplit(":", 1)[1], 16) for f in fields[1:3])
        if (local_port, remote_port) == (server_port, client_port):
            inodes.add(f"socket:[{fields[9]}]")
    for pid in stack.web_workers():
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                if os.readlink(fd) in inodes:
                    return pid
    raise AssertionError(f"no web worker serves the connection from port {client_port}")


@dataclass
class LongStream:
    """A long stream through the SDK, a few chunks read, and the web worker serving it."""

    request_id: str
    started_at: float  # Unix time just before it was sent
    words: list[str]
    rest: Iterator[Any]
    worker: int


def start_long_stream(stack: Stack, key: Key) -> LongStream:
    client = OpenAI(base_url=stack.gateway.v1, api_key=key.plaintext, max_retries=0, timeout=30)
    started_at = time.time()
    chunks = client.chat.completions.create(
        model="long", messages=HELLO, max_tokens=64, stream=True
    )
    rest = iter(chunks)
    words = [next(rest).choices[0].delta.content or "" for _ in range(5)]
    _host, client_port = chunks.response.extensions["network_stream"].get_extra_info("client_addr")
    return LongStream(
        request_id=chunks.response.headers["x-request-id"],
        started_at=started_at,
        words=words,
        rest=rest,
        worker=serving_worker(stack, client_port),
    )


def served_meanwhile(stack: Stack, key: Key, count: int, *, retries: int = 0) -> list[str]:
    """`count` requests, each answered 200 (by whichever web worker is alive)."""
    client = OpenAI(
        base_url=stack.gateway.v1, api_key=key.plaintext, max_retries=retries, timeout=30
    )
    ids = []
    for _ in range(count):
        raw = client.chat.completions.with_raw_response.create(
            model="r", messages=HELLO, max_tokens=MAX_TOKENS
        )
        assert raw.status_code == 200
        ids.append(raw.headers["x-request-id"])
    return ids


def wait_for_replacement(stack: Stack, dead: int) -> None:
    """uvicorn's supervisor starts a new web worker in place of the one gone."""
    wait_until(
        lambda: len(workers := stack.web_workers()) == 2 and dead not in workers,
        timeout_s=30,
        what="uvicorn to replace the web worker",
    )


def long_route(mock_url: str, org: Organization) -> Key:
    add_route(mock_url, org, "r", ("m", {}))
    add_route(mock_url, org, "long", LONG, deadline_ms=LONG_DEADLINE_MS)
    key = issue(org, "long", budget_nanos=1_000_000_000)
    return key


def stream_killed_mid_way(procs: Stack, org: Organization, key: Key) -> UsageEvent:
    """SIGKILL the web worker serving a long stream of `key`'s; once every request sent
    (the stream and others, served by the other worker) is in the ledger, the stream's."""
    wait_for_routes(procs, key, "r", "long")
    procs.worker()
    others = served_meanwhile(procs, key, 2)  # a budget's counter gets seeded

    stream = start_long_stream(procs, key)
    killed_at = time.monotonic()
    os.kill(stream.worker, signal.SIGKILL)
    with pytest.raises((httpx2.TransportError, openai.APIConnectionError)):
        for _chunk in stream.rest:
            pass
    others += served_meanwhile(procs, key, 5)  # by the other worker
    wait_for_replacement(procs, stream.worker)

    wait_for_ledger([*others, stream.request_id], orgs=[org])
    assert time.monotonic() - killed_at < LONG_HOLD_TTL_S / 2, "written long before the TTL"
    lost = UsageEvent.objects.get(pk=uuid.UUID(stream.request_id))
    assert (lost.outcome, lost.error_class, lost.model, lost.is_stream) == (
        UsageEvent.Outcome.UPSTREAM_ERROR, "worker_lost", "long", True,
    )  # fmt: skip
    assert (lost.cost_nanos, lost.priced) == (0, False)
    return lost


def test_a_web_worker_killed_mid_stream_has_its_stream_metered_as_lost(
    procs: Stack, org: Organization, mock_url: str
) -> None:
    """SIGKILL of the web worker serving a stream: the client sees the connection drop and
    the other worker keeps serving. The killed process cannot write the stream's event, but
    the stream's in-flight entry (written with its reserve, billing/inflight.py) becomes it
    once the process has stopped saying it is alive: `worker_lost`, unpriced, at no cost.
    Its hold is released then, long before the hold's own deadline, and a settle that came
    late would take nothing: the counter keeps equal to the ledger."""
    key = long_route(mock_url, org)
    lost = stream_killed_mid_way(procs, org, key)
    assert_budget_equals_ledger(procs.gateway, key)  # its hold released, nothing reserved
    client = procs.redis_client()
    try:
        settle_marker = client.get(f"tollgate:budget:settle:{lost.pk.hex}")
    finally:
        client.close()
    assert settle_marker == b"void", "a late settle of the lost stream would take nothing"


def test_a_web_worker_killed_mid_stream_of_a_key_with_no_limits_has_it_metered_as_lost(
    procs: Stack, org: Organization, mock_url: str
) -> None:
    """No budget or rate limit, so no reserve: the stream's in-flight entry was written by
    the usage producer when the stream called upstream, and becomes its event the same way."""
    long_route(mock_url, org)
    issued = virtual_key_issue(org=org, name="no limits", actor=TEST_ACTOR)
    key = Key(issued.plaintext, issued.key, limit_nanos=0)
    wait_for_routes(procs, key, "r", "long")
    info = httpx.get(
        f"{procs.gateway.v1}/key/info", headers={"authorization": f"Bearer {key.plaintext}"}
    ).json()
    assert (info["budgets"], info["rate_limits"]) == ([], []), info
    stream_killed_mid_way(procs, org, key)


def test_a_web_worker_stopped_with_sigterm_finishes_its_stream_and_meters_it(
    procs: Stack, org: Organization, mock_url: str
) -> None:
    """SIGTERM (what an orchestrator sends first): uvicorn stops accepting connections, lets
    the stream in flight finish, then the proxy settles and flushes its usage; the other
    worker serves meanwhile."""
    key = long_route(mock_url, org)
    wait_for_routes(procs, key, "r", "long")
    procs.worker()

    stream = start_long_stream(procs, key)
    os.kill(stream.worker, signal.SIGTERM)
    # A connection the stopping worker accepted in the instant before it stopped listening
    # is closed unanswered: a client retries it (the SDK's default), as here.
    others = served_meanwhile(procs, key, 5, retries=2)
    words = stream.words + [
        chunk.choices[0].delta.content or "" for chunk in stream.rest if chunk.choices
    ]
    assert len("".join(words).split()) == LONG_WORDS
    wait_for_replacement(procs, stream.worker)

    wait_for_ledger([*others, stream.request_id], orgs=[org])
    event = UsageEvent.objects.get(id=stream.request_id)
    assert (event.outcome, event.status_code, event.output_tokens) == ("success", 200, LONG_WORDS)
    assert_budget_equals_ledger(procs.gateway, key)


# ---------------------------------------------------------------- a load run with faults

# (route, deployments, route fields, streamed?): the answers a client may get from each.
LOAD_ROUTES: list[tuple[str, list[tuple[str, dict[str, Any]]], dict[str, Any], bool | None]] = [
    ("ok", [("m", {})], {}, None),
    ("failover", [("p+fault=500", FAST), ("b", FAST)], {}, None),
    ("reset", [("cut+fault=reset+tokens=20", FAST)], {}, True),
    ("hang", [("h+fault=hang", FAST), ("b", FAST)], {}, True),
    ("limited", [("l+fault=429+retry_after=1", FAST)], {"max_attempts": 1}, None),
]
# What a client may get in the load run: answers, and errors that say what happened.
LOAD_ANSWERS = {
    (200, ""),  # served (the backup's answer after a failover or a hang included)
    (200, "upstream_unreachable"),  # a stream reset mid-way: its chunks, then an error event
    (429, "budget_exceeded"),
    (429, "upstream_rate_limited"),
    (503, "no_deployment_available"),  # the lone 429 deployment's circuit is open
}
LOAD_SECONDS = 12.0


def test_a_load_run_with_faults_injected_ends_with_events_equal_to_requests(
    procs: Stack, org: Organization, mock_url: str
) -> None:
    """Twelve concurrent clients for LOAD_SECONDS over keys with hard budgets, three of them
    nearly spent, and routes whose providers fail (500 with a backup, a reset mid-stream, a
    hang with a backup, 429 alone), while the Celery worker is killed and replaced and
    PostgreSQL restarts. Afterwards every request is in the ledger once, with the status
    its client got, and no budget is over its limit or holds anything."""
    for model, deployments, route_fields, _stream in LOAD_ROUTES:
        add_route(mock_url, org, model, *deployments, **route_fields)
    # A request reserves about 180,000 nano-USD (16 output tokens at $10 per million, plus
    # the prompt's bytes): the first keys run out after ~10 requests, the third after ~500.
    keys = [
        issue(org, "nearly spent", budget_nanos=2_000_000),
        issue(org, "nearly spent too", budget_nanos=2_000_000),
        issue(org, "spent mid-run", budget_nanos=100_000_000),
        issue(org, "roomy", budget_nanos=1_000_000_000),
    ]
    wait_for_routes(procs, keys[0], *(model for model, *_ in LOAD_ROUTES))
    worker = procs.worker()

    def pick(n: int) -> tuple[Key, str, bool]:
        model, _deployments, _fields, stream = LOAD_ROUTES[(n // len(keys)) % len(LOAD_ROUTES)]
        return keys[n % len(keys)], model, (n % 2 == 0) if stream is None else stream

    client = procs.redis_client()
    started = time.monotonic()
    with Traffic(procs.gateway, pick, concurrency=12) as traffic:
        traffic.wait_for(50)
        # The worker dies (holding a batch, if it takes one within 10 s) and is replaced.
        with contextlib.suppress(AssertionError):
            wait_until(lambda: pending_entries(client), timeout_s=10)
        procs.kill_worker(worker)
        time.sleep(1.0)
        procs.start_worker()
        time.sleep(2.0)
        # PostgreSQL restarts.
        procs.relay.cut()
        time.sleep(RESTART_S)
        procs.relay.restore()
        time.sleep(max(1.0, LOAD_SECONDS - (time.monotonic() - started)))
    sent = traffic.sent
    client.close()

    answers = {(s.status, s.code) for s in sent}
    assert answers <= LOAD_ANSWERS, answers - LOAD_ANSWERS
    assert {(200, ""), (429, "budget_exceeded")} <= answers
    wait_for_ledger(answered_ids(sent), orgs=[org])
    events = {event.id.hex: event for event in UsageEvent.objects.filter(org=org)}
    for request in sent:
        event = events[request.request_id]
        if request.code == "upstream_unreachable":  # the stream's error event
            assert (event.status_code, event.error_class) == (502, request.code)
        else:
            assert (event.status_code, event.error_class) == (request.status, request.code)
    for key in keys:
        assert_budget_equals_ledger(procs.gateway, key)
    assert key_budget(procs.gateway, keys[0])["remaining_usd"] is not None
