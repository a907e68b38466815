"""Getting usage records into the ledger without making clients wait.

The proxy hands each record to a `UsageBuffer` (a list append on the event
loop); the buffer writes batches through a caller-supplied thread, so no
request ever waits for the database. Writes are idempotent on the event id, so
a batch retried after a failure is never counted twice.
"""

import asyncio
import contextlib
import functools
import json
import logging
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from typing import TypeVar

import orjson
from django.db import DataError, IntegrityError, connection, models, transaction
from django.db.models import Case, DateTimeField, Value, When
from django.db.models.functions import Coalesce, Greatest
from django.utils import timezone

from billing.contracts import LoggedBodies, UpstreamAttempt, UsageRecord
from billing.live import usage_live_publish
from billing.models import UsageEvent, UsageEventBody
from tenants.models import Organization, VirtualKey

logger = logging.getLogger(__name__)

T = TypeVar("T")
RunSync = Callable[[Callable[[], T]], Awaitable[T]]


def _event_from(record: UsageRecord) -> UsageEvent:
    usage = record.usage
    return UsageEvent(
        id=record.event_id,
        org_id=record.org_id,
        team_id=record.team_id,
        key_id=record.key_id,
        route_id=record.route_id,
        deployment_id=record.deployment_id,
        deployment_name=record.deployment_name,
        provider_kind=record.provider_kind,
        endpoint=record.endpoint,
        model=record.model,
        upstream_model=record.upstream_model,
        input_tokens=usage.input_tokens,
        cached_input_tokens=usage.cached_input_tokens,
        output_tokens=usage.output_tokens,
        reasoning_tokens=usage.reasoning_tokens,
        usage_estimated=usage.estimated,
        cost_nanos=record.cost_nanos,
        price_id=record.price_id,
        priced=record.priced,
        outcome=record.outcome,
        status_code=record.status_code,
        error_class=record.error_class,
        cache_hit=record.cache_hit,
        attempts=record.attempts,
        is_stream=record.is_stream,
        latency_ms=record.latency_ms,
        ttft_ms=record.ttft_ms,
        tags=list(record.tags),
        end_user=record.end_user,
        attempt_log=[_attempt_entry(attempt) for attempt in record.attempt_log],
        started_at=record.started_at,
        finished_at=record.finished_at,
    )


def _attempt_entry(attempt: UpstreamAttempt) -> dict[str, object]:
    return {
        "deployment_id": attempt.deployment_id,
        "deployment_name": attempt.deployment_name,
        "provider_kind": attempt.provider_kind,
        "outcome": attempt.outcome,
        "status_code": attempt.status_code,
        "error_class": attempt.error_class,
        "started_ms": attempt.started_ms,
        "duration_ms": attempt.duration_ms,
        "ttfb_ms": attempt.ttfb_ms,
    }


def _bodies_from(records: Sequence[UsageRecord]) -> list[UsageEventBody]:
    return [
        UsageEventBody(
            event_id=record.event_id,
            org_id=record.org_id,
            started_at=record.started_at,
            request_body=record.bodies.request,
            request_truncated=record.bodies.request_truncated,
            response_body=record.bodies.response,
            response_truncated=record.bodies.response_truncated,
        )
        for record in records
        if record.bodies is not None
    ]


def usage_events_write(records: Sequence[UsageRecord]) -> None:
    """Store `records` in the ledger; records already stored are left as they are."""
    if not records:
        return
    try:
        if connection.vendor == "postgresql":
            usage_events_insert_copy(records)
        else:
            usage_events_insert_orm(records)
    except IntegrityError:
        # A key or team deleted since the request: keep the event, drop the link.
        for record in records:
            _write_one_detached(_event_from(record))
        _bodies_write_kept(_bodies_from(records))
    _keys_mark_used(records)
    usage_live_publish(records)  # best effort, after the write: never raises


def usage_events_insert_orm(records: Sequence[UsageRecord]) -> None:
    """Insert the records' events and bodies with bulk_create, skipping event ids stored.

    The SQLite path, and the reference the COPY path must store exactly alike.
    Raises IntegrityError if a row's organization, team, key or price is gone.
    """
    with transaction.atomic():
        UsageEvent.objects.bulk_create(
            [_event_from(record) for record in records], ignore_conflicts=True
        )
        UsageEventBody.objects.bulk_create(_bodies_from(records), ignore_conflicts=True)


def _bodies_write_kept(bodies: list[UsageEventBody]) -> None:
    """Store the bodies whose events made it into the ledger (a dropped event's go too)."""
    if not bodies:
        return
    stored = set(
        UsageEvent.objects.filter(id__in=[body.event_id for body in bodies]).values_list(
            "id", flat=True
        )
    )
    kept = [body for body in bodies if body.event_id in stored]
    with transaction.atomic():
        UsageEventBody.objects.bulk_create(kept, ignore_conflicts=True)


def _keys_mark_used(records: Sequence[UsageRecord]) -> None:
    """Move each key's last_used_at forward to its newest request, never back.

    One UPDATE for the whole batch; .update() also skips the signals that would
    invalidate every proxy's configuration snapshot.
    """
    newest: dict[int, datetime] = {}
    for record in records:
        if record.key_id is not None:
            seen = newest.get(record.key_id)
            newest[record.key_id] = max(seen, record.finished_at) if seen else record.finished_at
    if not newest:
        return
    if connection.vendor == "postgresql":
        # The same in plain SQL: Django compiles one CASE branch per key, a visible
        # share of the ingestion worker's CPU with many keys in a batch.
        table = connection.ops.quote_name(VirtualKey._meta.db_table)
        with connection.cursor() as cursor:
            cursor.execute(
                f"UPDATE {table} AS k SET last_used_at = v.used_at"
                " FROM unnest(%s::bigint[], %s::timestamptz[]) AS v(id, used_at)"
                " WHERE k.id = v.id AND (k.last_used_at IS NULL OR k.last_used_at < v.used_at)",
                [list(newest), list(newest.values())],
            )
        return
    used_at = Case(
        *(When(pk=key_id, then=Value(moment)) for key_id, moment in newest.items()),
        output_field=DateTimeField(),
    )
    VirtualKey.objects.filter(pk__in=newest).update(
        last_used_at=Greatest(Coalesce("last_used_at", used_at), used_at)
    )


def _write_one_detached(event: UsageEvent) -> None:
    """Store one event, dropping links to a key or team deleted since the request.

    An event whose organization is gone cannot be attributed to anyone: it is
    logged and dropped rather than blocking every event queued behind it. One
    whose organization exists was refused for a value (a check such as a negative
    count): that is raised as a DataError, which the stream's drain sets aside in
    its dead-letter stream rather than losing it.
    """
    refusal: IntegrityError | None = None
    for detach in (False, True):
        if detach:
            # The cost stays exact even if the price row it came from is gone.
            event.key_id = event.team_id = event.price_id = None
        try:
            with transaction.atomic():
                UsageEvent.objects.bulk_create([event], ignore_conflicts=True)
            return
        except IntegrityError as exc:
            refusal = exc
    if Organization.objects.filter(pk=event.org_id).exists():
        raise DataError(f"usage event {event.id} refused: {refusal}") from refusal
    logger.error("Usage event %s dropped: its organization no longer exists", event.id)


# ---------------------------------------------------------------- PostgreSQL: COPY

# Django's bulk_create spends most of the ingestion worker's CPU building model
# instances and preparing and quoting 34 values per row (bench/README.md). On
# PostgreSQL the rows are built straight from the records and sent with COPY into a
# temporary table, then moved into the ledger by one INSERT … ON CONFLICT DO NOTHING
# (COPY itself cannot skip events already stored). COPY's text format, not binary:
# the server then parses and range-checks every value as an INSERT would (a binary
# int2 of 70000 is silently wrapped), so a bad value is a DataError as before.

# The columns _event_row and _body_row fill, in the models' field order: a column
# added to a model and not here stops every COPY (see _copy_statements) instead of
# being stored as NULL or its default.
_EVENT_COLUMNS = (
    "id", "org_id", "team_id", "key_id", "route_id", "deployment_id", "deployment_name",
    "provider_kind", "endpoint", "model", "upstream_model", "input_tokens",
    "cached_input_tokens", "output_tokens", "reasoning_tokens", "usage_estimated",
    "cost_nanos", "price_id", "priced", "outcome", "status_code", "error_class", "cache_hit",
    "attempts", "is_stream", "latency_ms", "ttft_ms", "tags", "end_user", "attempt_log",
    "statement_id", "started_at", "finished_at", "ingested_at",
)  # fmt: skip
_BODY_COLUMNS = (
    "event_id", "org_id", "started_at", "request_body", "request_truncated",
    "response_body", "response_truncated",
)  # fmt: skip


def usage_events_insert_copy(records: Sequence[UsageRecord]) -> None:
    """Insert the records' events and bodies with COPY (PostgreSQL), skipping event ids stored.

    Stores what usage_events_insert_orm stores and fails the same way: IntegrityError
    if a row's organization, team, key or price is gone (at commit: the foreign keys
    are deferred), DataError if a value does not fit its column.
    """
    ingested_at = timezone.now()  # auto_now_add's value, once for the batch
    events = [_event_row(record, ingested_at) for record in records]
    bodies = [_body_row(record, record.bodies) for record in records if record.bodies is not None]
    with transaction.atomic():
        _copy_insert(UsageEvent, _EVENT_COLUMNS, events)
        if bodies:
            _copy_insert(UsageEventBody, _BODY_COLUMNS, bodies)


def _event_row(record: UsageRecord, ingested_at: datetime) -> tuple[object, ...]:
    """The record as a ledger row, in _EVENT_COLUMNS order, for COPY's text format."""
    usage = record.usage
    return (
        record.event_id, record.org_id, record.team_id, record.key_id, record.route_id,
        record.deployment_id, record.deployment_name, record.provider_kind, record.endpoint,
        record.model, record.upstream_model, usage.input_tokens, usage.cached_input_tokens,
        usage.output_tokens, usage.reasoning_tokens, usage.estimated, record.cost_nanos,
        record.price_id, record.priced, record.outcome, record.status_code, record.error_class,
        record.cache_hit, record.attempts, record.is_stream, record.latency_ms, record.ttft_ms,
        _json_text(list(record.tags)), record.end_user,
        _json_text([_attempt_entry(attempt) for attempt in record.attempt_log]),
        None, record.started_at, record.finished_at, ingested_at,
    )  # fmt: skip


def _body_row(record: UsageRecord, bodies: LoggedBodies) -> tuple[object, ...]:
    """The record's bodies as a row, in _BODY_COLUMNS order."""
    return (
        record.event_id, record.org_id, record.started_at, bodies.request,
        bodies.request_truncated, bodies.response, bodies.response_truncated,
    )  # fmt: skip


def _json_text(value: list[object]) -> str:
    """The value as JSON text for a jsonb column, stored as the ORM would store it."""
    if not value:
        return "[]"
    try:
        # jsonb keeps the value, not the text: orjson's spacing and unescaped
        # non-ASCII store the same jsonb as the ORM's json.dumps.
        return orjson.dumps(value).decode()
    except orjson.JSONEncodeError:
        # What orjson refuses (a lone surrogate, an int beyond 64 bits) goes as the
        # ORM sends it, for PostgreSQL to store or refuse as it did before.
        return json.dumps(value)


def _copy_insert(
    model: type[models.Model], columns: tuple[str, ...], rows: list[tuple[object, ...]]
) -> None:
    """COPY `rows` into a temporary table, then insert those whose primary key is new."""
    create, copy_from, insert, drop = _copy_statements(model, columns)
    with connection.cursor() as cursor:
        cursor.execute(create)
        # Django wraps execute() only: COPY's errors become Django's DataError and
        # IntegrityError here, which the callers catch.
        with connection.wrap_database_errors, cursor.cursor.copy(copy_from) as copy:
            for row in rows:
                copy.write_row(row)
        cursor.execute(insert)
        # ON COMMIT DROP covers the usual case; inside an outer transaction (a
        # savepoint) the next batch would find the table still there.
        cursor.execute(drop)


@functools.cache
def _copy_statements(
    model: type[models.Model], columns: tuple[str, ...]
) -> tuple[str, str, str, str]:
    """The staging table's CREATE, its COPY, the INSERT into `model`'s table and the DROP."""
    expected = tuple(field.column for field in model._meta.concrete_fields)
    if columns != expected:
        raise RuntimeError(
            f"The COPY path fills {model.__name__} columns {columns}, the model has {expected}:"
            " update billing/ingest.py"
        )
    quote = connection.ops.quote_name
    table = quote(model._meta.db_table)
    staging = quote(f"{model._meta.db_table}_staging")
    names = ", ".join(quote(column) for column in columns)
    return (
        f"CREATE TEMPORARY TABLE {staging} (LIKE {table}) ON COMMIT DROP",
        f"COPY {staging} ({names}) FROM STDIN",
        f"INSERT INTO {table} ({names}) SELECT {names} FROM {staging}"
        f" ON CONFLICT ({quote(model._meta.pk.column)}) DO NOTHING",
        f"DROP TABLE {staging}",
    )


def _write_setting_aside_refused(records: Sequence[UsageRecord]) -> None:
    """Write `records`; one the ledger refuses as data is logged and dropped, else it
    would be retried forever and hold back every event behind it (a process writing
    its own usage has no dead-letter stream)."""
    try:
        usage_events_write(records)
        return
    except DataError:
        pass
    for record in records:
        try:
            usage_events_write([record])
        except DataError as exc:
            logger.error(
                "Usage event %s refused by the database, dropped: %s", record.event_id, exc
            )


class UsageBuffer:
    """Batches usage records from the event loop into the ledger."""

    inflight_key = None  # in-process: a dead process takes its buffer and counters along

    def __init__(
        self,
        *,
        run_sync: RunSync[None],
        flush_interval_s: float,
        batch_size: int,
    ) -> None:
        self._run_sync = run_sync
        self._flush_interval_s = flush_interval_s
        self._batch_size = batch_size
        self._pending: list[UsageRecord] = []
        self._wake = asyncio.Event()
        self._failures = 0

    def add(self, record: UsageRecord) -> None:
        """Queue one record; never blocks and never raises."""
        self._pending.append(record)
        if len(self._pending) >= self._batch_size:
            self._wake.set()

    def begin(self, request_id: str, entry: bytes) -> None:
        """Nothing to write ahead: see `inflight_key`."""

    @property
    def pending(self) -> int:
        return len(self._pending)

    async def run(self) -> None:
        """Flush forever (until cancelled), backing off while the database fails."""
        while True:
            delay = self._flush_interval_s * min(2**self._failures, 60)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=delay)
            self._wake.clear()
            await self.flush()

    async def flush(self) -> bool:
        """Write everything pending; on failure keep it for the next attempt."""
        while self._pending:
            batch = self._pending[: self._batch_size]
            try:
                await self._run_sync(lambda batch=batch: _write_setting_aside_refused(batch))  # type: ignore[misc]
            except Exception:
                self._failures += 1
                logger.exception(
                    "Writing %d usage events failed; %d kept for retry",
                    len(batch),
                    len(self._pending),
                )
                return False
            del self._pending[: len(batch)]
            self._failures = 0
        return True
