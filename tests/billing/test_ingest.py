"""Usage records into the ledger: idempotent, never lost, off the event loop."""

import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import pytest
from asgiref.sync import sync_to_async
from django.db import DataError, connection, connections
from django.db.models import Count, Sum
from django.utils import timezone

from billing import ingest
from billing.contracts import LoggedBodies, TokenUsage, UpstreamAttempt, UsageRecord
from billing.ingest import UsageBuffer, usage_events_insert_orm, usage_events_write
from billing.models import ModelPrice, UsageEvent, UsageEventBody
from tenants.models import Organization, Team, VirtualKey
from tenants.services import virtual_key_issue
from tests.conftest import TEST_ACTOR

T = TypeVar("T")

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)

postgresql_only = pytest.mark.skipif(
    connection.vendor != "postgresql", reason="the COPY path is PostgreSQL's"
)


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


# ---------------------------------------------------------------- the COPY path (PostgreSQL)


def test_copy_path_fills_every_column_of_the_ledger() -> None:
    """A field added to the models must be added to the COPY rows too, not stored as NULL."""
    for model, columns in (
        (UsageEvent, ingest._EVENT_COLUMNS),
        (UsageEventBody, ingest._BODY_COLUMNS),
    ):
        assert columns == tuple(field.column for field in model._meta.concrete_fields)


def full_record(key: VirtualKey, price: ModelPrice, **fields: Any) -> UsageRecord:
    """Every field set, with what COPY's text format must escape (tabs, newlines,
    backslashes, a literal \\N and \\.) and non-ASCII text."""
    attempts = (
        UpstreamAttempt(
            deployment_id=3, deployment_name="east\tab\there", provider_kind="openai",
            outcome="upstream_error", status_code=504, error_class="upstream_timeout",
            started_ms=2, duration_ms=5000,
        ),
        UpstreamAttempt(
            deployment_id=4, deployment_name="west", provider_kind="azure",
            outcome="upstream_error", status_code=429, error_class="rate_limited",
            started_ms=5003, duration_ms=12, ttfb_ms=None,
        ),
        UpstreamAttempt(
            deployment_id=5, deployment_name='nörd "quoted"', provider_kind="anthropic",
            outcome="success", status_code=200, started_ms=5016, duration_ms=800, ttfb_ms=150,
        ),
    )  # fmt: skip
    values: dict[str, Any] = {
        "route_id": 11, "deployment_id": 5, "deployment_name": "line\nbreak\tand \\ slash",
        "provider_kind": "anthropic", "upstream_model": "claude-test-2025",
        "usage": TokenUsage(input_tokens=9_000_000_000, cached_input_tokens=2_000,
                            output_tokens=321, reasoning_tokens=120, estimated=True),
        "cost_nanos": 9_223_372_036_854_775_807, "price_id": price.pk, "priced": False,
        "outcome": UsageEvent.Outcome.UPSTREAM_ERROR, "status_code": 503,
        "error_class": "upstream_timeout", "cache_hit": True, "attempts": 3, "is_stream": True,
        "latency_ms": 5_816, "ttft_ms": 5_166,
        "tags": ("team:Ünïcode", 'quote"and\\back', "tab\tnew\nline", "emoji:🚀"),
        "end_user": "Zoë 😀 \\N \t tab",
        "attempt_log": attempts,
        "bodies": LoggedBodies(
            request='{"messages":[{"content":"é\\n\\u0041\\t"}]}\r\n', request_truncated=True,
            response="data: {\"x\": \"ü\"}\n\n\\.\n", response_truncated=False,
        ),
        **fields,
    }  # fmt: skip
    return record(key, finished_at=T0 + timedelta(microseconds=123_457), **values)


def stored_row(model: type[UsageEvent] | type[UsageEventBody], pk: uuid.UUID) -> dict[str, Any]:
    """The row as the ORM reads it back, every concrete field."""
    columns = [field.attname for field in model._meta.concrete_fields]
    return model.objects.filter(pk=pk).values(*columns).get()


@postgresql_only
@pytest.mark.django_db
def test_copy_stores_every_column_as_the_orm_does(key: VirtualKey) -> None:
    price = ModelPrice.objects.create(
        provider_kind="anthropic", model="gpt-test", input_usd_per_mtok=1, output_usd_per_mtok=2,
        effective_from=T0 - timedelta(days=1),
    )  # fmt: skip
    copied, twin = full_record(key, price), full_record(key, price)
    before = timezone.now()

    usage_events_write([copied])  # PostgreSQL: the COPY path
    usage_events_insert_orm([twin])

    event, twin_event = (
        stored_row(UsageEvent, copied.event_id),
        stored_row(UsageEvent, twin.event_id),
    )
    assert before <= event.pop("ingested_at") <= twin_event.pop("ingested_at") <= timezone.now()
    assert (event.pop("id"), twin_event.pop("id")) == (copied.event_id, twin.event_id)
    assert event == twin_event
    assert event["tags"] == list(copied.tags)
    assert event["end_user"] == copied.end_user
    assert event["started_at"] == copied.started_at
    assert len(event["attempt_log"]) == 3 and event["attempt_log"][1]["ttfb_ms"] is None
    body, twin_body = (
        stored_row(UsageEventBody, copied.event_id),
        stored_row(UsageEventBody, twin.event_id),
    )
    assert (body.pop("event_id"), twin_body.pop("event_id")) == (copied.event_id, twin.event_id)
    assert body == twin_body
    assert (body["request_body"], body["response_body"]) == (
        copied.bodies.request, copied.bodies.response,  # type: ignore[union-attr]
    )  # fmt: skip
    assert (body["request_truncated"], body["response_truncated"]) == (True, False)


@pytest.mark.django_db
def test_nullable_fields_are_stored_as_null(key: VirtualKey) -> None:
    sent = record(
        key, team_id=None, key_id=None, route_id=None, deployment_id=None, price_id=None,
        latency_ms=None, ttft_ms=None, usage=TokenUsage(),
    )  # fmt: skip

    usage_events_write([sent])

    event = UsageEvent.objects.get(pk=sent.event_id)
    assert (event.team_id, event.key_id, event.price_id, event.statement_id) == (None,) * 4
    assert (event.route_id, event.deployment_id, event.latency_ms, event.ttft_ms) == (None,) * 4
    assert (event.tags, event.attempt_log, event.end_user) == ([], [], "")
    assert (event.input_tokens, event.output_tokens) == (0, 0)
    assert not UsageEventBody.objects.filter(event_id=sent.event_id).exists()


@pytest.mark.django_db
def test_writing_the_same_batch_with_bodies_twice_stores_each_event_and_body_once(
    key: VirtualKey,
) -> None:
    """Inside the test's transaction each write is a savepoint: the second one also shows
    the staging tables do not outlive the write that made them."""
    bodies = LoggedBodies(request="asked", response="answered", response_truncated=True)
    batch = [record(key, bodies=bodies), record(key, bodies=bodies), record(key)]

    usage_events_write(batch)
    usage_events_write(batch)

    assert ledger()["events"] == 3
    stored = list(UsageEventBody.objects.values_list("event_id", "response_body"))
    assert sorted(stored) == sorted((r.event_id, "answered") for r in batch[:2])


@pytest.mark.django_db(transaction=True)
def test_record_of_a_since_deleted_key_is_stored_detached_with_its_body(
    org: Organization, team: Team, key: VirtualKey
) -> None:
    doomed = virtual_key_issue(org=org, team=team, name="doomed", actor=TEST_ACTOR).key
    bodies = LoggedBodies(request="asked", response="answered")
    kept = [record(key, bodies=bodies) for _ in range(3)]
    orphan = record(doomed, bodies=bodies, cost_nanos=42)
    doomed.delete()

    usage_events_write([kept[0], orphan, *kept[1:]])

    stored = {event.id: event for event in UsageEvent.objects.all()}
    assert set(stored) == {r.event_id for r in [*kept, orphan]}
    assert (stored[orphan.event_id].key_id, stored[orphan.event_id].team_id) == (None, None)
    assert stored[orphan.event_id].cost_nanos == 42
    assert all(stored[r.event_id].key_id == key.pk for r in kept)
    assert UsageEventBody.objects.count() == 4


@postgresql_only
@pytest.mark.django_db
def test_values_postgresql_cannot_store_refuse_the_batch_as_data(key: VirtualKey) -> None:
    """A NUL character, a lone surrogate in JSON or a number beyond its column fails the
    batch with DataError, as bulk_create does: the stream drain then writes the batch
    record by record and dead-letters the one refused."""
    good = record(key)

    for bad in (
        record(key, end_user="nul\x00here"),
        record(key, bodies=LoggedBodies(request="nul\x00here")),
        record(key, tags=("nul\x00here",)),
        record(key, tags=("lone surrogate \ud800",)),
        record(key, status_code=70_000),  # beyond the column's range
    ):
        with pytest.raises(DataError):
            usage_events_write([good, bad])
        assert ledger()["events"] == 0

    usage_events_write([good])  # the connection is still usable
    assert ledger()["events"] == 1


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
async def test_buffer_drops_a_record_the_ledger_refuses_and_writes_the_others(
    key: VirtualKey,
) -> None:
    """Retried forever, a refused record would hold back every event behind it."""
    buffer = UsageBuffer(run_sync=FlakyRunner(), flush_interval_s=60, batch_size=10)
    good = [record(key, cost_nanos=3) for _ in range(2)]
    refused = record(key, usage=TokenUsage(input_tokens=1, output_tokens=-1))
    for item in (good[0], refused, good[1]):
        buffer.add(item)

    assert await buffer.flush() is True

    assert buffer.pending == 0
    assert sorted(await in_thread(stored_event_ids)) == sorted(r.event_id for r in good)


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
