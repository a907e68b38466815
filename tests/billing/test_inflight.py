"""Write-ahead usage entries (billing/inflight.py): a web process that dies with requests
in flight, or with events not yet sent, still has every request in the ledger once, and
its budget counters still equal what the ledger charges."""

import asyncio
import dataclasses
import logging
import random
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest
import pytest_asyncio
import redis.asyncio
from django.conf import settings

from billing.budget_counters import BudgetLine, InflightEntry, RedisBudgetCounters, budget_line
from billing.budget_leases import LeasedBudgetCounters
from billing.contracts import TokenUsage, UsageRecord
from billing.inflight import KEPT_FIELDS, WORKER_LOST, inflight_payload, inflight_reap
from billing.models import UsageEvent
from billing.stream import (
    UsageStreamProducer,
    inflight_producers_key,
    usage_record_decode,
    usage_stream_async_client,
)
from tests.billing.test_stream import make_record

pytestmark = [
    pytest.mark.asyncio,
    pytest.mark.skipif(not settings.REDIS_URL, reason="in-flight entries live in Redis"),
]

LIVE_S = 1.0  # how long a process's word that it is alive holds


async def until(check: Callable[[], Awaitable[object]], *, becomes: object = 1) -> None:
    """Poll `check` until it answers `becomes` (within 10 s)."""
    for _ in range(200):
        if await check() == becomes:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"still not {becomes!r} after 10 s")


@dataclass
class Process:
    """One web process's view: its usage producer (saying it is alive while `run` runs)
    and its budget counters."""

    producer: UsageStreamProducer
    counters: RedisBudgetCounters
    task: asyncio.Task[None]

    async def dies(self) -> None:
        """Killed outright: says nothing more, sends nothing more."""
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        live_key = f"{self.producer.inflight_key}:live"
        await until(lambda: self.producer.client.exists(live_key), becomes=0)


@pytest_asyncio.fixture
async def client() -> AsyncIterator[redis.asyncio.Redis]:
    connection = usage_stream_async_client(settings.REDIS_URL)
    yield connection
    await connection.aclose()


@pytest_asyncio.fixture
async def stream(client: redis.asyncio.Redis) -> AsyncIterator[str]:
    name = f"tollgate:usage:test-{uuid.uuid4().hex}"
    yield name
    keys = [key async for key in client.scan_iter(match=f"{name}*")]
    if keys:
        await client.delete(*keys)


@pytest_asyncio.fixture
async def process(
    client: redis.asyncio.Redis, stream: str, tmp_path: Path
) -> AsyncIterator[Process]:
    producer = UsageStreamProducer(
        client=client, stream=stream, spool_dir=tmp_path, flush_interval_s=3600,
        batch_size=100, live_s=LIVE_S,
    )  # fmt: skip
    task = asyncio.create_task(producer.run())
    await until(lambda: client.sismember(inflight_producers_key(stream), producer.producer))
    yield Process(producer, RedisBudgetCounters(client), task)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def a_line(counters: RedisBudgetCounters) -> BudgetLine:
    """A fresh hard line of $1 this month, seeded at zero."""
    line = budget_line(
        budget_id=random.randrange(10**9, 2 * 10**9), period="monthly", time_zone="UTC",
        limit_nanos=10**9, hard=True, at=datetime.now(UTC),
    )  # fmt: skip
    await counters.seed(line, 0)
    return line


def provisional(**fields: object) -> UsageRecord:
    """A request as admission knows it (the fields routing/proxy/metering.py writes ahead)."""
    return make_record(is_stream=True, **fields)


async def admitted(process: Process, line: BudgetLine, record: UsageRecord) -> str:
    """Reserve 5,000 nanos for `record`'s request, its entry written with the hold."""
    request_id = record.event_id.hex
    known = {name: getattr(record, name) for name in KEPT_FIELDS}
    entry = InflightEntry(process.producer.inflight_key, inflight_payload(known, [line]))
    result = await process.counters.reserve(request_id, [line], 5_000, 60, inflight=entry)
    assert result.admitted
    return request_id


async def stream_records(client: redis.asyncio.Redis, stream: str) -> list[UsageRecord]:
    return [usage_record_decode(fields) for _id, fields in await client.xrange(stream)]


async def line_totals(counters: RedisBudgetCounters, line: BudgetLine) -> tuple[int | None, int]:
    (spend,) = await counters.spent([line])
    return spend.settled_nanos, spend.reserved_nanos


async def test_a_dead_process_s_unfinished_request_is_written_as_lost_and_its_hold_released(
    client: redis.asyncio.Redis, stream: str, process: Process
) -> None:
    line = await a_line(process.counters)
    record = provisional(model="long-stream")
    request_id = await admitted(process, line, record)

    assert await inflight_reap(client, stream) == 0, "its process is alive"
    assert await stream_records(client, stream) == []

    await process.dies()
    assert await inflight_reap(client, stream) == 1
    (lost,) = await stream_records(client, stream)
    # What admission knew, as a failure the process never wrote: no usage, no cost, unpriced.
    assert lost == dataclasses.replace(
        record, outcome=UsageEvent.Outcome.UPSTREAM_ERROR, status_code=502,
        error_class=WORKER_LOST, attempts=0, usage=TokenUsage(), cost_nanos=0, priced=False,
        finished_at=lost.finished_at,
    )  # fmt: skip
    assert lost.finished_at > record.started_at
    assert await line_totals(process.counters, line) == (0, 0), "hold released, nothing charged"

    # A settle arriving after all (the process was only frozen) takes nothing: the
    # counter keeps equal to the ledger, which keeps the first event of an id.
    late = await process.counters.settle(request_id, [line], 4_000)
    assert not late.applied
    assert await line_totals(process.counters, line) == (0, 0)

    assert await inflight_reap(client, stream) == 0, "reaped once"
    # Another reaper racing this one finds it voided, not settled: still unpriced.
    assert await process.counters.abandon(request_id, [line.key_prefix]) is None
    assert not await client.sismember(inflight_producers_key(stream), process.producer.producer)


async def test_a_dead_process_s_settled_but_unsent_request_is_written_at_its_settled_cost(
    client: redis.asyncio.Redis, stream: str, process: Process
) -> None:
    line = await a_line(process.counters)
    record = provisional()
    request_id = await admitted(process, line, record)
    await process.counters.settle(request_id, [line], 3_210)
    process.producer.add(make_record(event_id=record.event_id, cost_nanos=3_210))  # never sent

    await process.dies()
    assert await inflight_reap(client, stream) == 1
    (lost,) = await stream_records(client, stream)
    assert (lost.event_id, lost.error_class) == (record.event_id, WORKER_LOST)
    assert (lost.cost_nanos, lost.priced) == (3_210, True)
    assert await line_totals(process.counters, line) == (3_210, 0), "the ledger's figure"


async def test_a_sent_event_forgets_its_entry_and_nothing_more_is_written(
    client: redis.asyncio.Redis, stream: str, process: Process
) -> None:
    line = await a_line(process.counters)
    records = [provisional() for _ in range(3)]
    for record in records:
        await admitted(process, line, record)
    assert await client.hlen(process.producer.inflight_key) == 3

    finished = [make_record(event_id=record.event_id, cost_nanos=1_000) for record in records[:2]]
    for record in finished:
        await process.counters.settle(record.event_id.hex, [line], 1_000)
        process.producer.add(record)
    assert await process.producer.flush()
    assert await client.hlen(process.producer.inflight_key) == 1, "the unfinished one's"

    await process.dies()
    assert await inflight_reap(client, stream) == 1
    written = await stream_records(client, stream)
    assert [r.event_id for r in written] == [r.event_id for r in [*finished, records[2]]]
    assert [r.error_class for r in written] == ["", "", WORKER_LOST]
    assert await line_totals(process.counters, line) == (2_000, 0)


async def test_an_entry_that_cannot_be_read_is_dropped_without_stopping_the_others(
    client: redis.asyncio.Redis, stream: str, process: Process
) -> None:
    line = await a_line(process.counters)
    record = provisional()
    await admitted(process, line, record)
    await client.hset(process.producer.inflight_key, "f" * 32, b"\nnot json")

    await process.dies()
    assert await inflight_reap(client, stream) == 1
    assert [r.event_id for r in await stream_records(client, stream)] == [record.event_id]
    assert not await client.exists(process.producer.inflight_key)


async def test_a_request_with_no_reserve_is_written_ahead_when_it_calls_upstream(
    client: redis.asyncio.Redis, stream: str, process: Process
) -> None:
    """No budget or rate limit: no reserve carries the entry, the producer writes it
    (within BEGIN_FLUSH_S), unless the request's own event goes in the same write."""
    streaming, quick = provisional(model="free-stream"), provisional()
    for record in (streaming, quick):
        known = {name: getattr(record, name) for name in KEPT_FIELDS}
        process.producer.begin(record.event_id.hex, inflight_payload(known))
    process.producer.add(make_record(event_id=quick.event_id))  # answered at once
    await until(lambda: client.hlen(process.producer.inflight_key))
    assert await client.hkeys(process.producer.inflight_key) == [streaming.event_id.hex.encode()]

    await process.dies()
    assert await inflight_reap(client, stream) == 1
    written = await stream_records(client, stream)
    assert [(r.event_id, r.error_class) for r in written] == [
        (quick.event_id, ""), (streaming.event_id, WORKER_LOST),
    ]  # fmt: skip
    assert (written[1].model, written[1].cost_nanos, written[1].priced) == ("free-stream", 0, False)


async def test_a_dead_process_s_budget_lease_is_released_without_an_event(
    client: redis.asyncio.Redis, stream: str, process: Process, caplog: pytest.LogCaptureFixture
) -> None:
    line = await a_line(process.counters)
    leases = LeasedBudgetCounters(
        process.counters, inflight_key=process.producer.inflight_key, lease_after=2
    )
    for _ in range(2):  # busy: a lease is taken
        request_id = uuid.uuid4().hex
        assert (await leases.reserve(request_id, [line], 5_000, 60)).admitted
        await leases.settle(request_id, [line], 1_000)
        await asyncio.sleep(0.01)
    assert (await leases.reserve(uuid.uuid4().hex, [line], 5_000, 60)).leased  # in flight
    settled, held = await line_totals(process.counters, line)
    assert settled == 2_000 and held >= 4 * 5_000  # the lease holds room ahead

    await process.dies()
    with caplog.at_level(logging.WARNING, logger="billing.inflight"):
        assert await inflight_reap(client, stream) == 0, "a lease is no request: no event"
    assert await stream_records(client, stream) == []
    assert await line_totals(process.counters, line) == (2_000, 0), "released now, not at expiry"
    assert not await client.exists(process.producer.inflight_key)
    assert "unreadable" not in caplog.text, "read as a lease's entry"


async def test_a_returned_lease_leaves_no_entry_to_reap(
    client: redis.asyncio.Redis, stream: str, process: Process
) -> None:
    line = await a_line(process.counters)
    leases = LeasedBudgetCounters(
        process.counters, inflight_key=process.producer.inflight_key, lease_after=2
    )
    for _ in range(3):
        request_id = uuid.uuid4().hex
        await leases.reserve(request_id, [line], 5_000, 60)
        await leases.settle(request_id, [line], 1_000)
        await asyncio.sleep(0.01)
    assert await client.hlen(process.producer.inflight_key) == 1  # the lease's entry
    await leases.aclose()
    assert await client.hlen(process.producer.inflight_key) == 0
    assert await line_totals(process.counters, line) == (3_000, 0)
