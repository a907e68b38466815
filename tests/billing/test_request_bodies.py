"""Logged bodies and attempt logs: written with their event, carried by the stream,
pruned before (or with) their event."""

import uuid
from datetime import timedelta
from typing import Any

import pytest
from django.utils import timezone

from billing.bodies import body_log_max_bytes, body_log_retention_days, usage_bodies_prune
from billing.contracts import LoggedBodies, TokenUsage, UpstreamAttempt, UsageRecord
from billing.ingest import usage_events_write
from billing.models import UsageEvent, UsageEventBody
from billing.reconciliation import usage_events_prune
from billing.rollup_tasks import usage_events_prune_task
from billing.stream import ENTRY_FIELD, usage_record_decode, usage_record_encode
from tenants.models import Organization, VirtualKey
from tenants.services import virtual_key_issue
from tests.conftest import TEST_ACTOR

pytestmark = pytest.mark.django_db

ATTEMPTS = (
    UpstreamAttempt(
        deployment_id=3, deployment_name="east", provider_kind="openai",
        outcome="upstream_error", status_code=504, error_class="upstream_timeout",
        started_ms=2, duration_ms=5000,
    ),
    UpstreamAttempt(
        deployment_id=4, deployment_name="west", provider_kind="azure", outcome="success",
        status_code=200, started_ms=5003, duration_ms=800, ttfb_ms=150,
    ),
)  # fmt: skip
BODIES = LoggedBodies(
    request='{"model":"m","messages":[]}', response="data: é\n\n", response_truncated=True
)


def record(org: Organization, *, key: VirtualKey | None = None, **fields: Any) -> UsageRecord:
    now = fields.pop("started_at", timezone.now())
    values: dict[str, Any] = {
        "event_id": uuid.uuid4(), "org_id": org.pk, "team_id": None,
        "key_id": key.pk if key else None, "endpoint": "chat.completions", "model": "m",
        "outcome": "success", "status_code": 200, "started_at": now, "finished_at": now,
        "usage": TokenUsage(input_tokens=10, output_tokens=2), "cost_nanos": 50,
        "attempts": 2, "attempt_log": ATTEMPTS, "bodies": BODIES,
    }  # fmt: skip
    return UsageRecord(**{**values, **fields})


def test_bodies_and_attempts_are_written_with_their_event_once(org: Organization) -> None:
    kept, metadata_only = record(org), record(org, bodies=None)
    usage_events_write([kept, metadata_only])
    usage_events_write([kept])  # a retried batch: nothing is doubled
    event = UsageEvent.objects.get(pk=kept.event_id)
    assert event.attempts == len(event.attempt_log) == 2
    assert event.attempt_log[0] == {
        "deployment_id": 3, "deployment_name": "east", "provider_kind": "openai",
        "outcome": "upstream_error", "status_code": 504, "error_class": "upstream_timeout",
        "started_ms": 2, "duration_ms": 5000, "ttfb_ms": None,
    }  # fmt: skip
    assert event.attempt_log[1]["ttfb_ms"] == 150
    body = UsageEventBody.objects.get()
    assert (body.event_id, body.org_id, body.started_at) == (kept.event_id, org.pk, kept.started_at)
    assert (body.request_body, body.request_truncated) == (BODIES.request, False)
    assert (body.response_body, body.response_truncated) == ("data: é\n\n", True)


@pytest.mark.django_db(transaction=True)
def test_a_body_survives_its_key_being_deleted_before_ingestion(org: Organization) -> None:
    """Foreign keys are checked at commit, so this needs a real transaction."""
    key = virtual_key_issue(org=org, name="gone", actor=TEST_ACTOR).key
    late, fine = record(org, key=key), record(org)
    key.delete()
    usage_events_write([late, fine])
    assert UsageEvent.objects.get(pk=late.event_id).key_id is None
    assert set(UsageEventBody.objects.values_list("event_id", flat=True)) == {
        late.event_id, fine.event_id,
    }  # fmt: skip


@pytest.mark.django_db(transaction=True)
def test_the_body_of_an_event_that_cannot_be_stored_is_dropped_with_it(
    org: Organization,
) -> None:
    orphan, fine = record(org, org_id=org.pk + 1_000), record(org)
    usage_events_write([orphan, fine])
    assert list(UsageEvent.objects.values_list("id", flat=True)) == [fine.event_id]
    assert list(UsageEventBody.objects.values_list("event_id", flat=True)) == [fine.event_id]


def test_attempts_and_bodies_round_trip_through_the_usage_stream(org: Organization) -> None:
    original = record(org)
    assert usage_record_decode({ENTRY_FIELD: usage_record_encode(original)}) == original
    plain = record(org, bodies=None, attempt_log=(), attempts=0)
    assert usage_record_decode({ENTRY_FIELD: usage_record_encode(plain)}) == plain


def test_an_entry_from_before_attempt_logs_still_decodes(org: Organization) -> None:
    """Entries written by an older proxy (no attempt_log, no bodies) are read with defaults."""
    import orjson

    payload = orjson.loads(usage_record_encode(record(org)))
    del payload["attempt_log"], payload["bodies"]
    decoded = usage_record_decode({ENTRY_FIELD: orjson.dumps(payload)})
    assert decoded.attempt_log == () and decoded.bodies is None


def test_bodies_go_after_their_retention_while_the_events_stay(
    org: Organization, settings: Any
) -> None:
    settings.TOLLGATE_BODY_LOG_RETENTION_DAYS = 7
    now = timezone.now()
    old, recent = (
        record(org, started_at=now - timedelta(days=8)),
        record(org, started_at=now - timedelta(days=6)),
    )
    usage_events_write([old, recent])
    assert usage_bodies_prune(now=now, batch_size=1) == 1
    assert list(UsageEventBody.objects.values_list("event_id", flat=True)) == [recent.event_id]
    assert UsageEvent.objects.filter(pk=old.event_id).exists()


def test_body_retention_never_outlives_the_events(settings: Any) -> None:
    settings.TOLLGATE_USAGE_RETENTION_DAYS = 20
    settings.TOLLGATE_BODY_LOG_RETENTION_DAYS = 90
    assert body_log_retention_days() == 20
    settings.TOLLGATE_USAGE_RETENTION_DAYS = 400
    assert body_log_retention_days() == 90
    settings.TOLLGATE_BODY_LOG_MAX_BYTES = 1024
    assert body_log_max_bytes() == 1024


def test_pruning_an_event_deletes_its_body(org: Organization, settings: Any) -> None:
    settings.TOLLGATE_USAGE_RETENTION_DAYS = 30
    settings.TOLLGATE_BODY_LOG_RETENTION_DAYS = 30
    old = record(org, started_at=timezone.now() - timedelta(days=45))
    usage_events_write([old])
    UsageEvent.objects.update(ingested_at=timezone.now() - timedelta(hours=1))
    # Without the bodies' own pass first, the event's deletion has one to cascade to.
    result = usage_events_prune()
    assert result.events == 1
    assert not UsageEventBody.objects.exists()


def test_the_prune_task_reports_the_bodies_it_deleted(org: Organization, settings: Any) -> None:
    settings.TOLLGATE_BODY_LOG_RETENTION_DAYS = 3
    usage_events_write([record(org, started_at=timezone.now() - timedelta(days=4))])
    outcome = usage_events_prune_task()
    assert outcome["bodies"] == 1 and outcome["events"] == 0
    assert UsageEvent.objects.count() == 1 and not UsageEventBody.objects.exists()
