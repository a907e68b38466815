"""Usage ingestion through the Redis Stream: nothing lost, nothing counted twice."""

import asyncio
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import orjson
import psycopg
import pytest
import redis
import redis.asyncio
from django.conf import settings
from django.db import InterfaceError, OperationalError, connection
from django.db.models import Count, Sum

import billing.stream
from billing.contracts import TokenUsage, UsageRecord
from billing.models import UsageEvent
from billing.stream import (
    ENTRY_FIELD,
    USAGE_GROUP,
    MalformedUsageEntry,
    UsageStreamProducer,
    dead_letter_stream,
    usage_record_decode,
    usage_record_encode,
    usage_stream_async_client,
    usage_stream_drain,
    usage_stream_forget_idle_consumers,
)
from tenants.models import Organization, Team, VirtualKey
from tenants.services import virtual_key_issue
from tests.conftest import TEST_ACTOR
from tests.support.processes import REPO_ROOT, free_port

needs_redis = pytest.mark.skipif(
    not settings.REDIS_URL, reason="the usage stream needs Redis (REDIS_URL is unset)"
)

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


def make_record(key: VirtualKey | None = None, **fields: Any) -> UsageRecord:
    values: dict[str, Any] = {
        "event_id": uuid.uuid4(),
        "org_id": key.org_id if key else 1,
        "team_id": key.team_id if key else None,
        "key_id": key.pk if key else None,
        "endpoint": "chat.completions",
        "model": "gpt-test",
        "outcome": UsageEvent.Outcome.SUCCESS,
        "status_code": 200,
        "started_at": T0,
        "finished_at": T0 + timedelta(milliseconds=250),
        "usage": TokenUsage(input_tokens=10, output_tokens=5),
        "cost_nanos": 1_000,
        **fields,
    }
    return UsageRecord(**values)


# ---------------------------------------------------------------- serialisation


def test_record_survives_the_round_trip_exactly() -> None:
    sent = make_record(
        usage=TokenUsage(input_tokens=2**40, cached_input_tokens=7, output_tokens=3,
                         reasoning_tokens=1, estimated=True),
        cost_nanos=9_223_372_036_854_775_807,  # the largest BigIntegerField, not a float
        started_at=datetime(2025, 3, 1, 17, 30, 0, 123_456, tzinfo=timezone(timedelta(hours=5))),
        route_id=4, deployment_id=9, deployment_name="east", provider_kind="openai",
        upstream_model="gpt-4o", price_id=12, priced=False, error_class="timeout",
        cache_hit=True, attempts=3, is_stream=True, latency_ms=812, ttft_ms=95,
    )  # fmt: skip

    received = usage_record_decode({ENTRY_FIELD: usage_record_encode(sent)})

    assert received == sent
    assert received.started_at.utcoffset() == timedelta(hours=5)


def test_entry_from_an_older_producer_decodes_with_defaults_and_ignores_unknown_fields() -> None:
    payload = orjson.loads(usage_record_encode(make_record()))
    for optional in ("route_id", "cost_nanos", "usage", "ttft_ms"):
        del payload[optional]
    payload["field_from_the_future"] = {"x": 1}

    received = usage_record_decode({ENTRY_FIELD: orjson.dumps(payload)})

    assert received.event_id == uuid.UUID(payload["event_id"])
    assert (received.route_id, received.cost_nanos, received.ttft_ms) == (None, 0, None)
    assert received.usage == TokenUsage()


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"v": 99}, "version"),
        ({"org_id": None}, "org_id"),
        ({"cost_nanos": 1.5}, "cost_nanos"),
        ({"event_id": "not-a-uuid"}, "event_id"),
        ({"started_at": "2025-03-01T12:00:00"}, "time zone"),
        ({"usage": {"input_tokens": "ten"}}, "usage.input_tokens"),
    ],
)
def test_entries_that_cannot_be_records_are_refused_with_a_reason(
    change: dict[str, object], reason: str
) -> None:
    payload = {**orjson.loads(usage_record_encode(make_record())), **change}

    with pytest.raises(MalformedUsageEntry, match=reason):
        usage_record_decode({ENTRY_FIELD: orjson.dumps(payload)})


# ---------------------------------------------------------------- Redis and the ledger


@pytest.fixture
def client() -> Iterator[redis.Redis]:
    connection_ = redis.Redis.from_url(settings.REDIS_URL)
    yield connection_
    connection_.close()


@pytest.fixture
def stream(client: redis.Redis) -> Iterator[str]:
    """A stream of this test's own, so no other consumer (a session worker) reads it."""
    name = f"tollgate:usage:test-{uuid.uuid4().hex}"
    yield name
    client.delete(name, dead_letter_stream(name))


@pytest.fixture
def key(org: Organization, team: Team) -> VirtualKey:
    return virtual_key_issue(org=org, team=team, name="stream", actor=TEST_ACTOR).key


def push(client: redis.Redis, stream: str, *payloads: bytes) -> None:
    for payload in payloads:
        client.xadd(stream, {ENTRY_FIELD: payload})


def drain(client: redis.Redis, stream: str, consumer: str = "worker-a", **options: Any) -> Any:
    values = {"max_batches": 100, "batch_size": 50, "claim_idle_ms": 60_000, **options}
    return usage_stream_drain(consumer=consumer, client=client, stream=stream, **values)


def ledger() -> dict[str, int]:
    return UsageEvent.objects.aggregate(events=Count("id"), cost_nanos=Sum("cost_nanos"))


def pending(client: redis.Redis, stream: str) -> int:
    return int(client.xpending(stream, USAGE_GROUP)["pending"])


def producer_for(client: redis.asyncio.Redis, stream: str, spool_dir: Path) -> UsageStreamProducer:
    return UsageStreamProducer(
        client=client, stream=stream, spool_dir=spool_dir, flush_interval_s=0.05, batch_size=40
    )


@needs_redis
@pytest.mark.django_db(transaction=True)
def test_producer_to_ledger_writes_every_record_once_and_empties_the_stream(
    client: redis.Redis, stream: str, key: VirtualKey, tmp_path: Path
) -> None:
    records = [make_record(key, cost_nanos=n) for n in range(1, 121)]

    async def produce() -> None:
        producer = producer_for(usage_stream_async_client(settings.REDIS_URL), stream, tmp_path)
        for record in records:
            producer.add(record)
        assert await producer.flush()
        assert producer.pending == 0
        await producer.aclose()

    asyncio.run(produce())
    assert client.xlen(stream) == 120

    counts = drain(client, stream)

    assert (counts.written, counts.batches) == (120, 3)
    assert ledger() == {"events": 120, "cost_nanos": sum(range(1, 121))}
    stored = UsageEvent.objects.get(pk=records[7].event_id)
    assert (stored.key_id, stored.team_id, stored.input_tokens) == (key.pk, key.team_id, 10)
    # Acknowledged entries are deleted: the stream does not grow.
    assert client.xlen(stream) == 0
    assert pending(client, stream) == 0


@needs_redis
@pytest.mark.django_db(transaction=True)
def test_records_added_while_a_flush_is_sending_wait_for_the_next_flush(
    client: redis.Redis, stream: str, key: VirtualKey, tmp_path: Path
) -> None:
    """On a busy event loop a send takes a while: a flush that also sent what arrived
    meanwhile would chain small batches back to back instead of one per interval."""

    async def produce() -> tuple[list[int], int]:
        producer = producer_for(usage_stream_async_client(settings.REDIS_URL), stream, tmp_path)
        sent_batches: list[int] = []
        send = producer._send

        async def slow_send(payloads: Any, ids: Any, begun: Any = ()) -> None:
            sent_batches.append(len(payloads))
            if len(sent_batches) <= 2:
                for _ in range(5):
                    producer.add(make_record(key))  # requests finishing while it is sent
            await send(payloads, ids, begun)

        producer._send = slow_send  # type: ignore[method-assign]
        for _ in range(30):
            producer.add(make_record(key))
        assert await producer.flush()
        left = producer.pending
        assert await producer.flush()
        await producer.aclose()
        return sent_batches, left

    sent_batches, left = asyncio.run(produce())
    assert sent_batches == [30, 5]
    assert left == 5
    assert client.xlen(stream) == 35


@needs_redis
@pytest.mark.django_db(transaction=True)
def test_an_entry_delivered_twice_is_counted_once(
    client: redis.Redis, stream: str, key: VirtualKey
) -> None:
    record = make_record(key, cost_nanos=777)
    # e.g. a spool replayed after part of it had reached Redis
    push(client, stream, usage_record_encode(record))
    drain(client, stream)
    push(client, stream, usage_record_encode(record), usage_record_encode(record))
    drain(client, stream)

    assert ledger() == {"events": 1, "cost_nanos": 777}
    assert client.xlen(stream) == 0


class WorkerCrash(BaseException):
    """Stands for the process dying: nothing after it runs."""


@needs_redis
@pytest.mark.django_db(transaction=True)
def test_a_batch_committed_but_never_acknowledged_is_claimed_and_counted_once(
    client: redis.Redis, stream: str, key: VirtualKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    records = [make_record(key, cost_nanos=10) for _ in range(30)]
    push(client, stream, *(usage_record_encode(record) for record in records))
    real_write = billing.stream.usage_events_write

    def write_then_die(batch: list[UsageRecord]) -> None:
        real_write(batch)  # committed...
        raise WorkerCrash  # ...and the process dies before acknowledging

    monkeypatch.setattr(billing.stream, "usage_events_write", write_then_die)
    with pytest.raises(WorkerCrash):
        drain(client, stream, consumer="dies", batch_size=20)
    monkeypatch.setattr(billing.stream, "usage_events_write", real_write)
    assert ledger()["events"] == 20
    assert pending(client, stream) == 20

    # A live consumer leaves another's entries alone until they have been idle long enough...
    early = drain(client, stream, consumer="survivor", claim_idle_ms=60_000)
    assert (early.claimed, early.written) == (0, 10)
    assert pending(client, stream) == 20
    # ...then takes them over; the ledger already has them and keeps one of each.
    time.sleep(0.15)
    late = drain(client, stream, consumer="survivor", claim_idle_ms=100)

    assert (late.claimed, late.written) == (20, 20)
    assert ledger() == {"events": 30, "cost_nanos": 300}
    assert client.xlen(stream) == 0
    assert pending(client, stream) == 0


@needs_redis
@pytest.mark.django_db(transaction=True)
def test_entries_read_by_a_consumer_that_vanished_are_ingested_by_another(
    client: redis.Redis, stream: str, key: VirtualKey
) -> None:
    records = [make_record(key) for _ in range(5)]
    push(client, stream, *(usage_record_encode(record) for record in records))
    client.xgroup_create(stream, USAGE_GROUP, id="0")
    client.xreadgroup(USAGE_GROUP, "vanished", {stream: ">"}, count=5)  # reads, never acks

    time.sleep(0.15)
    counts = drain(client, stream, consumer="survivor", claim_idle_ms=100)

    assert counts.claimed == 5
    assert set(UsageEvent.objects.values_list("id", flat=True)) == {r.event_id for r in records}
    assert pending(client, stream) == 0


@needs_redis
@pytest.mark.skipif(connection.vendor != "postgresql", reason="drops a PostgreSQL connection")
@pytest.mark.django_db(transaction=True)
def test_the_same_consumer_retries_its_own_batch_after_a_database_outage(
    client: redis.Redis, stream: str, key: VirtualKey
) -> None:
    records = [make_record(key) for _ in range(8)]
    push(client, stream, *(usage_record_encode(record) for record in records))
    # The database drops this process's connection, as a PostgreSQL restart does.
    connection.ensure_connection()
    database = connection.settings_dict
    with psycopg.connect(
        dbname=database["NAME"], user=database["USER"], password=database["PASSWORD"] or None,
        host=database["HOST"] or "127.0.0.1", port=database["PORT"] or 5432, autocommit=True,
    ) as admin:  # fmt: skip
        admin.execute("SELECT pg_terminate_backend(%s)", [connection.connection.info.backend_pid])

    with pytest.raises((OperationalError, InterfaceError)):
        drain(client, stream)
    assert pending(client, stream) == 8
    connection.close()

    counts = drain(client, stream, claim_idle_ms=60_000)

    assert counts.written == 8
    assert ledger()["events"] == 8
    assert pending(client, stream) == 0


@needs_redis
@pytest.mark.django_db(transaction=True)
def test_malformed_entries_go_to_the_dead_letters_and_the_queue_moves_on(
    client: redis.Redis, stream: str, key: VirtualKey
) -> None:
    good = [make_record(key, cost_nanos=5) for _ in range(3)]
    out_of_range = make_record(key, status_code=70_000)  # beyond the column: the database refuses
    push(client, stream, usage_record_encode(good[0]), b"{not json")
    client.xadd(stream, {b"something": b"else"})
    push(
        client,
        stream,
        usage_record_encode(good[1]),
        usage_record_encode(out_of_range),
        orjson.dumps({"v": 2, "event_id": str(uuid.uuid4())}),
        usage_record_encode(good[2]),
    )

    counts = drain(client, stream)

    assert (counts.written, counts.dead) == (3, 4)
    assert ledger() == {"events": 3, "cost_nanos": 15}
    assert client.xlen(stream) == 0
    assert pending(client, stream) == 0
    dead = client.xrange(dead_letter_stream(stream))
    reasons = sorted(fields[b"dead_reason"].decode() for _id, fields in dead)
    assert len(reasons) == 4
    assert any("not JSON" in reason for reason in reasons)
    assert any("no record field" in reason for reason in reasons)
    assert any("version 2" in reason for reason in reasons)
    assert any("refused by the database" in reason for reason in reasons)
    # The dead letter keeps the entry as it was, for a person to look at and replay.
    kept = {fields[ENTRY_FIELD] for _id, fields in dead if ENTRY_FIELD in fields}
    assert usage_record_encode(out_of_range) in kept


@needs_redis
@pytest.mark.django_db(transaction=True)
def test_an_entry_the_ledger_s_checks_refuse_is_dead_lettered_not_dropped(
    client: redis.Redis, stream: str, key: VirtualKey
) -> None:
    """Refused by a check (a negative count) rather than by a deleted owner: kept for a
    person to look at, as a value out of range is."""
    good = make_record(key, cost_nanos=5)
    negative = make_record(key, usage=TokenUsage(input_tokens=10, output_tokens=-5))
    push(client, stream, usage_record_encode(negative), usage_record_encode(good))

    counts = drain(client, stream)

    assert (counts.written, counts.dead) == (1, 1)
    assert ledger() == {"events": 1, "cost_nanos": 5}
    dead = client.xrange(dead_letter_stream(stream))
    assert [fields[ENTRY_FIELD] for _id, fields in dead] == [usage_record_encode(negative)]
    assert "refused by the database" in dead[0][1][b"dead_reason"].decode()
    assert pending(client, stream) == 0


@needs_redis
def test_idle_consumers_are_forgotten_unless_they_hold_entries(
    client: redis.Redis, stream: str
) -> None:
    push(client, stream, usage_record_encode(make_record()), usage_record_encode(make_record()))
    client.xgroup_create(stream, USAGE_GROUP, id="0")
    client.xreadgroup(USAGE_GROUP, "holds-one", {stream: ">"}, count=1)
    client.xgroup_createconsumer(stream, USAGE_GROUP, "holds-none")
    time.sleep(0.05)

    removed = usage_stream_forget_idle_consumers(idle_ms=10, client=client, stream=stream)

    assert removed == 1
    names = {info["name"] for info in client.xinfo_consumers(stream, USAGE_GROUP)}
    assert names == {b"holds-one"}


# ---------------------------------------------------------------- Redis down: the spool


@pytest.fixture
def redis_port() -> Iterator[int]:
    """A port where a private Redis can be started (and stopped) by the test."""
    yield free_port()


def start_redis(port: int, tmp_path: Path) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    probe = redis.Redis(port=port)
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


@needs_redis
@pytest.mark.django_db(transaction=True)
def test_records_are_spooled_while_redis_is_down_and_replayed_when_it_is_back(
    key: VirtualKey, tmp_path: Path, redis_port: int
) -> None:
    spool_dir = tmp_path / "spool"
    records = [make_record(key, cost_nanos=3) for _ in range(100)]
    stream = "tollgate:usage"
    private_url = f"redis://127.0.0.1:{redis_port}/0"

    async def while_down() -> None:
        producer = producer_for(usage_stream_async_client(private_url), stream, spool_dir)
        for record in records:
            producer.add(record)
        # Shutdown-style flush: nothing may stay only in memory.
        assert await producer.flush()
        assert (producer.pending, producer.spooled) == (0, 100)
        await producer.aclose()

    asyncio.run(while_down())
    [spool_file] = spool_dir.iterdir()
    assert len(spool_file.read_bytes().splitlines()) == 100

    server = start_redis(redis_port, tmp_path)
    try:
        back = redis.Redis(port=redis_port)

        async def when_back() -> None:
            producer = producer_for(usage_stream_async_client(private_url), stream, spool_dir)
            producer.add(records[0])  # a new record after the outage; duplicates are harmless
            assert await producer.flush()
            assert producer.spooled == 0
            await producer.aclose()

        asyncio.run(when_back())
        assert list(spool_dir.iterdir()) == []
        assert back.xlen(stream) == 101

        usage_stream_drain(
            consumer="w", max_batches=10, batch_size=50, claim_idle_ms=60_000,
            client=back, stream=stream,
        )  # fmt: skip

        assert ledger() == {"events": 100, "cost_nanos": 300}
        back.close()
    finally:
        server.terminate()
        server.wait()


@needs_redis
@pytest.mark.django_db(transaction=True)
def test_the_spool_of_a_process_that_crashed_is_replayed_by_another(
    client: redis.Redis, stream: str, key: VirtualKey, tmp_path: Path, redis_port: int
) -> None:
    spool_dir = tmp_path / "spool"
    event_ids = [uuid.uuid4() for _ in range(25)]
    # A web process spools while Redis is away, then is killed before Redis returns.
    script = f"""
import asyncio, os, uuid
import django
django.setup()
from pathlib import Path
from billing.stream import UsageStreamProducer, usage_stream_async_client
from tests.billing.test_stream import make_record

async def main():
    producer = UsageStreamProducer(
        client=usage_stream_async_client("redis://127.0.0.1:{redis_port}/0"), stream={stream!r},
        spool_dir=Path({str(spool_dir)!r}), flush_interval_s=0.05, batch_size=10,
    )
    for event_id in {[str(event_id) for event_id in event_ids]!r}:
        producer.add(make_record(event_id=uuid.UUID(event_id), org_id={key.org_id},
                                 team_id={key.team_id}, key_id={key.pk}))
    assert await producer.flush()
    os._exit(9)  # a crash: the spool file stays open and locked until the kernel lets go

asyncio.run(main())
"""
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO_ROOT, env=os.environ, capture_output=True,
        timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 9, result.stderr.decode()[-2000:]
    assert len(list(spool_dir.iterdir())) == 1

    async def another_process() -> None:
        producer = producer_for(usage_stream_async_client(settings.REDIS_URL), stream, spool_dir)
        assert await producer.flush()  # at start-up it looks for spools left behind
        await producer.aclose()

    asyncio.run(another_process())
    drain(client, stream)

    assert list(spool_dir.iterdir()) == []
    assert set(UsageEvent.objects.values_list("id", flat=True)) == set(event_ids)
