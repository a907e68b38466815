"""Publishing written usage to the live feed: one message per org per batch, and never
at the cost of the ledger."""

import uuid
from datetime import timedelta

import pytest
from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.utils import timezone

from billing import live
from billing.contracts import TokenUsage, UsageRecord
from billing.ingest import usage_events_write
from billing.models import UsageEvent
from tenants.models import Organization
from tests.factories import OrganizationFactory

pytestmark = pytest.mark.django_db


def record(org: Organization, *, model: str = "gpt-4o-mini") -> UsageRecord:
    now = timezone.now()
    return UsageRecord(
        event_id=uuid.uuid4(), org_id=org.pk, team_id=None, key_id=None,
        endpoint="chat.completions", model=model, outcome="success", status_code=200,
        started_at=now - timedelta(seconds=2), finished_at=now,
        usage=TokenUsage(input_tokens=3, output_tokens=4), cost_nanos=42,
    )  # fmt: skip


def test_a_summary_row_has_plain_json_types_and_no_secrets() -> None:
    org = OrganizationFactory()
    sent = record(org)
    row = live.live_row(sent)
    assert row["id"] == str(sent.event_id)
    assert row["started_at"] == sent.started_at.isoformat()
    assert (row["cost_nanos"], row["input_tokens"], row["output_tokens"]) == (42, 3, 4)
    assert set(row) == {
        "id", "started_at", "key_id", "team_id", "model", "status_code", "outcome",
        "input_tokens", "output_tokens", "cost_nanos", "latency_ms", "is_stream",
    }  # fmt: skip


def test_each_org_gets_one_message_per_batch_with_its_own_rows_only() -> None:
    first, second = OrganizationFactory.create_batch(2)
    batch = [record(first, model="a"), record(second, model="b"), record(first, model="c")]

    async def listen_and_write() -> list[dict]:
        layer = get_channel_layer()
        inbox = await layer.new_channel()
        await layer.group_add(live.live_group(first.pk), inbox)
        # Published from the running loop here: the message is sent on this loop.
        live.usage_live_publish(batch)
        message = await layer.receive(inbox)
        await layer.group_discard(live.live_group(first.pk), inbox)
        return [message]

    (message,) = async_to_sync(listen_and_write)()
    assert message["type"] == "live.usage"
    assert [row["model"] for row in message["requests"]] == ["a", "c"]


def test_a_failing_channel_layer_never_stops_ingestion(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken() -> None:
        raise ConnectionError("channel layer unreachable")

    monkeypatch.setattr(live, "get_channel_layer", broken)
    org = OrganizationFactory()
    sent = record(org)
    usage_events_write([sent])
    assert UsageEvent.objects.filter(pk=sent.event_id).exists()
    assert "Publishing live usage failed" in caplog.text


def test_without_a_channel_layer_nothing_is_published(settings, monkeypatch) -> None:
    settings.CHANNEL_LAYERS = {}
    sent: list[object] = []
    monkeypatch.setattr(live, "_send_all", lambda *args: sent.append(args))
    org = OrganizationFactory()
    usage_events_write([record(org)])
    assert sent == [] and UsageEvent.objects.filter(org=org).count() == 1
