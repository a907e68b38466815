"""Managing alert channels: edit, enable or disable, delete, and send a test alert.

Creating a channel and rotating its secret live in billing/alerts.py (re-exported
here); the audit entries name the channel and, for webhooks, only the URL's host,
since a receiver's token may sit in its path. Secrets never reach the audit log.
"""

from dataclasses import dataclass

from django.db import transaction
from django.utils import timezone

from billing.alerts import (
    alert_channel_create,
    alert_channel_secret_rotate,
    alert_delivery_attempt,
    channel_facts,
    webhook_url_check,
)
from billing.models import Alert, AlertChannel, AlertDelivery
from tenants.selectors import one_line
from tenants.services import Actor, audit_record

__all__ = [
    "NOTIFY_FIELDS",
    "TestOutcome",
    "alert_channel_create",
    "alert_channel_delete",
    "alert_channel_enable",
    "alert_channel_secret_rotate",
    "alert_channel_test_send",
    "alert_channel_update",
]

# The events a channel may subscribe to (AlertChannel.notify_<kind>).
NOTIFY_FIELDS = ("notify_threshold", "notify_exhausted", "notify_spike")


@transaction.atomic
def alert_channel_update(
    *,
    channel: AlertChannel,
    name: str,
    actor: Actor,
    url: str = "",
    recipients: str = "",
    notify_threshold: bool = True,
    notify_exhausted: bool = True,
    notify_spike: bool = True,
) -> AlertChannel:
    """Change a channel's name, destination and events; its kind and secret stay."""
    channel = AlertChannel.objects.select_for_update().get(pk=channel.pk)
    before, url_before = channel_facts(channel), channel.url
    channel.name = name
    if channel.kind == AlertChannel.Kind.WEBHOOK:
        channel.url = url.strip()
    else:
        channel.recipients = recipients.strip()
    channel.notify_threshold = notify_threshold
    channel.notify_exhausted = notify_exhausted
    channel.notify_spike = notify_spike
    channel.full_clean()
    if channel.kind == AlertChannel.Kind.WEBHOOK and channel.url != url_before:
        webhook_url_check(channel.url)
    after = channel_facts(channel)
    changed = [key for key in after if after[key] != before[key]]
    if not changed and channel.url == url_before:
        return channel
    channel.save()
    # A new path on the same host shows as "url changed": the path may hold a token.
    url_note = {"url_changed": True} if channel.url != url_before else {}
    audit_record(
        actor=actor,
        org=channel.org,
        action="alert_channel.update",
        target=channel,
        before={key: before[key] for key in changed},
        after={**{key: after[key] for key in changed}, **url_note},
    )
    return channel


@transaction.atomic
def alert_channel_enable(*, channel: AlertChannel, enabled: bool, actor: Actor) -> AlertChannel:
    """Turn a channel on or off; a disabled channel gets no new deliveries."""
    channel = AlertChannel.objects.select_for_update().get(pk=channel.pk)
    if channel.enabled == enabled:
        return channel
    channel.enabled = enabled
    channel.save(update_fields=["enabled"])
    audit_record(
        actor=actor,
        org=channel.org,
        action="alert_channel.enable" if enabled else "alert_channel.disable",
        target=channel,
        before={"enabled": not enabled},
        after={"enabled": enabled},
    )
    return channel


@transaction.atomic
def alert_channel_delete(*, channel: AlertChannel, actor: Actor) -> None:
    """Delete a channel with its deliveries; the alerts themselves stay recorded."""
    audit_record(
        actor=actor,
        org=channel.org,
        action="alert_channel.delete",
        target=channel,
        before=channel_facts(channel),
    )
    channel.delete()


@dataclass(frozen=True, slots=True)
class TestOutcome:
    delivered: bool
    # What went wrong, in a few words (never a URL, secret or response body); "" if delivered.
    error: str
    response_status: int | None


def alert_channel_test_send(*, channel: AlertChannel, actor: Actor) -> TestOutcome:
    """Record a test alert for this one channel and attempt its delivery now.

    It goes through the same path as real alerts (signed webhook or e-mail, the
    delivery row and its attempt), but is not retried: a failure is final, so a
    receiver that is down does not get the test an hour later.
    """
    org = channel.org
    now = timezone.now()
    with transaction.atomic():
        alert = Alert.objects.create(
            org=org,
            kind=Alert.Kind.TEST,
            period_id=f"t{now:%Y%m%dT%H%M%S%f}",
            message=one_line(
                f"Test alert from Tollgate for channel '{channel.name}' of {org.name}."
            ),
        )
        alert.payload = {
            "id": alert.pk,
            "event": Alert.Kind.TEST.value,
            "created_at": alert.created_at.isoformat(),
            "message": alert.message,
            "org": {"id": org.pk, "slug": org.slug, "name": org.name},
            "channel": {"id": channel.pk, "name": channel.name},
        }
        alert.save(update_fields=["payload"])
        delivery = AlertDelivery.objects.create(alert=alert, channel=channel, next_attempt_at=now)
    delivered = alert_delivery_attempt(delivery.pk)
    if not delivered:
        AlertDelivery.objects.filter(pk=delivery.pk, status=AlertDelivery.Status.PENDING).update(
            status=AlertDelivery.Status.FAILED, next_attempt_at=None
        )
    delivery.refresh_from_db()
    audit_record(
        actor=actor,
        org=org,
        action="alert_channel.test",
        target=channel,
        after={"delivered": delivered, "error": delivery.last_error},
    )
    return TestOutcome(
        delivered=delivered, error=delivery.last_error, response_status=delivery.response_status
    )
