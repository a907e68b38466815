"""Usage records into the ledger: idempotent, never lost, off the event loop."""

import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import pytest
from asgiref.sync import sync_to_async
from django.db import connections
from django.db.models import Count, Sum

from billing.contracts import TokenUsage, UsageRecord
from billing.ingest import UsageBuffer, usage_events_write
from billing.models import ModelPrice, UsageEvent
from tenants.models import Organization, Team, VirtualKey
from tenants.services import virtual_key_issue
from tests.conftest import TEST_ACTOR

T = TypeVar("T")

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def key(org: Organization, team: Team) -> VirtualKey:
    return virtual_key_issue(org=org, team=team, name="ingest", actor=TEST_ACTOR).key


def record(
    key: VirtualKey, *, finished_at: datetime = T0, cost_nanos: int = 1_000, **fields: Any
) -> UsageRecord:
    """A successful chat request made with `key`."""
    values: dict[str, Any] = {
        "event_id": uuid.uuid4(),
        "org_id": key.org_id,
        "team_id": key.team_id,
        "key_id": key.pk,
        "endpoint": "chat.completions",
        "model": "gpt-test",
        "outcome": UsageEvent.Outcome.SUCCESS,
        "status_code": 200,
        "started_at": finished_at - timedelta(milliseconds=300),
        "finished_at": finished_at,
        "usage": TokenUsage(input_tokens=10, output_tokens=5),
        "cost_nanos": cost_nanos,
        **fields,
    }
    return UsageRecord(**values)


def ledger() -> dict[str, int]:
    return UsageEvent.objects.aggregate(events=Count("id"), cost_nanos=Sum("cost_nanos"))


# ---------------------------------------------------------------- usage_events_write


@pytest.mark.django_db
def test_writing_the_same_batch_twice_stores_each_event_once(key: VirtualKey) -> None:
    batch = [record(key, cost_nanos=cost) for cost in (150_000, 75, 1)]

    usage_events_write(batch)
    after_first = ledger()
    usage_events_write(batch)

    assert after_first == {"events": 3, "cost_nanos": 150_076}
    assert ledger() == after_first
    assert set(UsageEvent.objects.values_list("id", flat=True)) == {r.event_id for r in batch}


@pytest.mark.django_db
def test_overlapping_batches_store_only_the_new_events(key: VirtualKey) -> None:
    first, second, third = (record(key, cost_nanos=100) for _ in range(3))

    usage_events_write([first, second])
    usage_events_write([second, third])

    assert ledger() == {"events": 3, "cost_nanos": 300}


@pytest.mark.django_db
def test_stored_event_keeps_what_the_proxy_reported(key: VirtualKey) -> None:
    sent = record(
        key,
        usage=TokenUsage(input_tokens=1_000, cached_input_tokens=200, output_tokens=50,
                         reasoning_tokens=20, estimated=True),
        cost_nanos=123_456_789,
        priced=False,
        is_stream=True,
        latency_ms=812,
    )  # fmt: skip

    usage_events_write([sent])

    event = UsageEvent.objects.get(pk=sent.event_id)
    assert (event.org_id, event.team_id, event.key_id) == (sent.org_id, sent.team_id, sent.key_id)
    assert (event.input_tokens, event.cached_input_tokens) == (1_000, 200)
    assert (event.output_tokens, event.reasoning_tokens) == (50, 20)
    assert event.usage_estimated and event.is_stream and not event.priced
    assert event.cost_nanos == 123_456_789
    assert event.finished_at == sent.finished_at
    assert event.latency_ms == 812


@pytest.mark.django_db
def test_key_last_used_at_becomes_the_newest_finished_at_of_the_batch(key: VirtualKey) -> None:
    finished = [T0 + timedelta(seconds=5), T0 + timedelta(seconds=9), T0]

    usage_events_write([record(key, finished_at=moment) for moment in finished])

    key.refresh_from_db()
    assert key.last_used_at == T0 + timedelta(seconds=9)


@pytest.mark.django_db
def test_key_last_used_at_never_moves_backwards(key: VirtualKey) -> None:
    usage_events_write([record(key, finished_at=T0 + timedelta(minutes=1))])
    usage_events_write([record(key, finished_at=T0)])

    key.refresh_from_db()
    assert key.last_used_at == T0 + timedelta(minutes=1)


@pytest.mark.django_db(transaction=True)
def test_record_of_a_missing_key_is_stored_detached_and_the_batch_is_kept(
    key: VirtualKey,
) -> None:
    """Foreign keys are checked at commit, so this needs a real transaction."""
    missing_key_id = VirtualKey.objects.order_by("-pk").values_list("pk", flat=True)[0] + 1_000
    before = record(key, finished_at=T0)
    orphan = record(key, key_id=missing_key_id, finished_at=T0 + timedelta(seconds=1))
    after = record(key, finished_at=T0 + timedelta(seconds=2))

    usage_events_write([before, orphan, after])

    stored = {event.id: event for event in UsageEvent.objects.all()}
    assert set(stored) == {before.event_id, orphan.event_id, after.event_id}
    assert (stored[orphan.event_id].key_id, stored[orphan.event_id].team_id) == (None, None)
    assert stored[orphan.event_id].org_id == key.org_id
    assert stored[orphan.event_id].cost_nanos == orphan.cost_nanos
    for kept in (before, after):
        assert (stored[kept.event_id].key_id, stored[kept.event_id].team_id) == (
            key.pk,
            key.team_id,
        )


@pytest.mark.django_db(transaction=True)
def test_record_priced_by_a_since_deleted_price_row_is_not_lost(key: VirtualKey) -> None:
    price = ModelPrice.objects.create(
        provider_kind="mock", model="gpt-test", input_usd_per_mtok=1, output_usd_per_mtok=2,
        effective_from=T0 - timedelta(days=1),
    )  # fmt: skip
    priced = record(key, price_id=price.pk, cost_nanos=20_000)
    price.delete()

    usage_events_write([priced])

    assert UsageEvent.objects.filter(pk=priced.event_id, cost_nanos=20_000).exists()


# ---------------------------------------------------------------- UsageBuffer


async def in_thread(function: Callable[[], T]) -> T:
    """Run ORM code in a worker thread, handing its connection back afterwards."""

    def run() -> T:
        try:
            return function()
        finally:
            connections.close_all()

    return await sync_to_async(run)()


class FlakyRunner:
    """A `run_sync` that runs through `in_thread` and can be told to fail."""

    def __init__(self, *, fail_before: int = 0, fail_after: int = 0) -> None:
        self.calls = 0
        self.fail_before = fail_before  # fail this many calls without writing
        self.fail_after = fail_after  # fail this many calls after writing

    async def __call__(self, function: Callable[[], T]) -> T:
        self.calls += 1
        if self.fail_before:
            self.fail_before -= 1
            raise ConnectionError("database unavailable")
        result = await in_thread(function)
        if self.fail_after:
            self.fail_after -= 1
            raise ConnectionError("connection lost after commit")
        return result


def stored_event_ids() -> list[uuid.UUID]:
    return list(UsageEvent.objects.values_list("id", flat=True))


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
async def test_buffer_flush_writes_every_record_through_run_sync(key: VirtualKey) -> None:
    runner = FlakyRunner()
    buffer = UsageBuffer(run_sync=runner, flush_interval_s=60, batch_size=2)
    records = [record(key) for _ in range(5)]
    for item in records:
        buffer.add(item)

    assert buffer.pending == 5
    assert await buffer.flush() is True

    assert buffer.pending == 0
    assert runner.calls == 3  # batches of 2, 2 and 1
    assert sorted(await in_thread(stored_event_ids)) == sorted(r.event_id for r in records)


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
async def test_buffer_keeps_records_when_run_sync_fails_and_writes_them_once_later(
    key: VirtualKey,
) -> None:
    runner = FlakyRunner(fail_before=1)
    buffer = UsageBuffer(run_sync=runner, flush_interval_s=60, batch_size=10)
    records = [record(key, cost_nanos=7) for _ in range(4)]
    for item in records:
        buffer.add(item)

    assert await buffer.flush() is False
    assert buffer.pending == 4
    assert await in_thread(stored_event_ids) == []

    assert await buffer.flush() is True
    assert buffer.pending == 0
    assert sorted(await in_thread(stored_event_ids)) == sorted(r.event_id for r in records)
    assert await in_thread(ledger) == {"events": 4, "cost_nanos": 28}


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
async def test_buffer_retry_after_a_failure_reported_past_commit_counts_nothing_twice(
    key: VirtualKey,
) -> None:
    runner = FlakyRunner(fail_after=1)
    buffer = UsageBuffer(run_sync=runner, flush_interval_s=60, batch_size=3)
    records = [record(key, cost_nanos=5) for _ in range(3)]
    for item in records:
        buffer.add(item)

    assert await buffer.flush() is False
    assert buffer.pending == 3
    buffer.add(late := record(key, cost_nanos=5))

    assert await buffer.flush() is True
    assert buffer.pending == 0
    assert sorted(await in_thread(stored_event_ids)) == sorted(r.event_id for r in [*records, late])
    assert await in_thread(ledger) == {"events": 4, "cost_nanos": 20}
