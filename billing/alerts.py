"""Budget alerts: thresholds, exhausted budgets and spend spikes, recorded once, then delivered.

Off the hot path. A periodic check turns budget standings (read from the same
counters the proxy enforces) into `Alert` rows; the database's conditional
unique constraints make each alert happen once per budget, threshold and
period (once per org and clock hour for a spike), however many workers
evaluate at the same moment. Each new alert gets one `AlertDelivery` per
enabled channel of its org that wants that kind; deliveries are attempted by
Celery (`billing/alert_tasks.py`) with exponential backoff until delivered or
out of attempts. A delivered delivery is never sent again.
"""

import json
import logging
import secrets
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal
from typing import Any
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.mail import send_mail
from django.db import transaction
from django.db.models import F, Min, Q, Sum
from django.utils import timezone

from billing.budget_counters import BudgetCounters
from billing.budget_ledger import in_thread
from billing.budget_standing import BudgetStanding, abudget_standings
from billing.models import (
    Alert,
    AlertChannel,
    AlertDelivery,
    RollupMeasures,
    UsageEvent,
    UsageRollup,
    recipients_parse,
)
from billing.pricing import NANOS_PER_USD, nanos_to_usd
from billing.rollups import hour_floor
from billing.webhooks import (  # webhook_signature*: re-exported for receivers
    SIGNATURE_HEADER,
    host_is_private,
    webhook_post,
    webhook_signature,
    webhook_signature_verify,  # noqa: F401
)
from tenants.crypto import SecretUnreadable
from tenants.models import Budget, Organization
from tenants.selectors import budget_label, one_line
from tenants.services import Actor, audit_record

logger = logging.getLogger(__name__)

Kind = Alert.Kind
Status = AlertDelivery.Status
HOUR = timedelta(hours=1)
SPIKE_BASELINE = timedelta(days=7)
SPIKE_MIN_HISTORY = timedelta(hours=24)
# How long one attempt may hold a delivery before another worker may take it
# over (webhook timeout plus e-mail and database time, with room to spare).
ATTEMPT_LEASE = timedelta(seconds=60)
MAX_BACKOFF = timedelta(hours=1)
WEBHOOK_TIMEOUT_S = 10.0
_CENT = Decimal("0.01")


# ---------------------------------------------------------------- presentation


def usd_cents(nanos: int) -> Decimal:
    """Dollars rounded half up to the cent: the one place an alert rounds money."""
    return nanos_to_usd(nanos).quantize(_CENT, rounding=ROUND_HALF_UP)


def usd(nanos: int) -> str:
    """Nano-USD as "$1,234.56"."""
    return f"${usd_cents(nanos):,}"


def _local(moment: datetime, time_zone: str) -> str:
    return f"{moment.astimezone(ZoneInfo(time_zone)):%Y-%m-%d %H:%M} {time_zone}"


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat()


def _resets(standing: BudgetStanding, time_zone: str) -> str:
    if standing.period_end is None:
        return "a lifetime budget never resets"
    return f"resets {_local(standing.period_end, time_zone)}"


# ---------------------------------------------------------------- recording


def _deliveries_create(alert: Alert) -> list[int]:
    channels = AlertChannel.objects.filter(org_id=alert.org_id, enabled=True)
    wanted = [channel for channel in channels if channel.wants(alert.kind)]
    now = timezone.now()
    deliveries = AlertDelivery.objects.bulk_create(
        [AlertDelivery(alert=alert, channel=channel, next_attempt_at=now) for channel in wanted]
    )
    return [delivery.pk for delivery in deliveries]


def _alert_record(
    lookup: dict[str, Any], values: dict[str, Any], payload: Callable[[Alert], dict[str, Any]]
) -> list[int]:
    """Create the alert unless it exists, with its deliveries; their ids ([] if it existed).

    `get_or_create` retries its read after an IntegrityError, so of two workers
    racing on the same alert exactly one creates it (and its deliveries).
    """
    with transaction.atomic():
        alert, created = Alert.objects.get_or_create(**lookup, defaults=values)
        if not created:
            return []
        alert.payload = payload(alert)
        alert.save(update_fields=["payload"])
        delivery_ids = _deliveries_create(alert)
    logger.info("Alert %s recorded: %s", alert.pk, alert.message)
    return delivery_ids


def _thresholds(budget: Budget) -> list[int]:
    values = budget.soft_thresholds if isinstance(budget.soft_thresholds, list) else []
    return sorted(
        {v for v in values if isinstance(v, int) and not isinstance(v, bool) and 0 < v <= 10_000}
    )


def _budget_payload(
    alert: Alert, budget: Budget, standing: BudgetStanding, at: datetime
) -> dict[str, Any]:
    forecast = standing.forecast(at)
    projected = forecast.projected_nanos
    return {
        "id": alert.pk,
        "event": alert.kind,
        "created_at": _iso(alert.created_at),
        "message": alert.message,
        "org": {"id": budget.org.pk, "slug": budget.org.slug, "name": budget.org.name},
        "budget": {
            "id": budget.pk,
            "scope": budget.scope,
            "team": None
            if budget.team is None
            else {"id": budget.team.pk, "name": budget.team.name},
            "key": None
            if budget.key is None
            else {"id": budget.key.pk, "name": budget.key.name, "prefix": budget.key.prefix},
            "period": budget.period,
            "enforcement": "hard" if standing.hard else "soft",
            "limit_nanos": standing.limit_nanos,
            "limit_usd": str(usd_cents(standing.limit_nanos)),
        },
        "period": {
            "id": standing.period_id,
            "start": _iso(standing.period_start),
            "end": _iso(standing.period_end),
            "time_zone": budget.org.time_zone,
        },
        "threshold_pct": alert.threshold if alert.kind == Kind.THRESHOLD else None,
        "spend_nanos": alert.spend_nanos,
        "spend_usd": str(usd_cents(alert.spend_nanos)),
        "reserved_nanos": standing.reserved_nanos,
        "refused": standing.refused,
        "forecast": {
            "projected_nanos": projected,
            "projected_usd": None if projected is None else str(usd_cents(projected)),
            "exhausted_at": _iso(forecast.exhausted_at),
        },
    }


def _threshold_message(budget: Budget, standing: BudgetStanding, pct: int, at: datetime) -> str:
    settled, tz = standing.settled_nanos or 0, budget.org.time_zone
    text = (
        f"{budget_label(budget)} reached {pct}% ({usd(settled)} of "
        f"{usd(standing.limit_nanos)}); {_resets(standing, tz)}."
    )
    runs_out = standing.forecast(at).exhausted_at
    if runs_out is not None and runs_out > at:
        text += f" At this rate it runs out {_local(runs_out, tz)}."
    return text


def _exhausted_message(budget: Budget, standing: BudgetStanding) -> str:
    settled, limit, tz = standing.settled_nanos or 0, standing.limit_nanos, budget.org.time_zone
    label = budget_label(budget)
    if settled < limit:  # a hard budget refused a request that no longer fit
        return (
            f"{label} refused a request: {usd(settled)} of {usd(limit)} spent, too little "
            f"left for it; {_resets(standing, tz)}."
        )
    if not standing.hard:
        return (
            f"{label} exhausted ({usd(settled)} of {usd(limit)}); a soft limit, so requests "
            f"still pass; {_resets(standing, tz)}."
        )
    if standing.period_end is None:
        return f"{label} exhausted ({usd(settled)} of {usd(limit)}); requests are refused."
    return (
        f"{label} exhausted ({usd(settled)} of {usd(limit)}); requests are refused until "
        f"it {_resets(standing, tz)}."
    )


def _budget_alerts_due(
    budget: Budget, standing: BudgetStanding, at: datetime
) -> list[tuple[str, int, str]]:
    """(kind, threshold, message) of every alert the standing calls for, lowest first."""
    settled, limit = standing.settled_nanos or 0, standing.limit_nanos
    due = [
        (Kind.THRESHOLD.value, pct, _threshold_message(budget, standing, pct, at))
        for pct in _thresholds(budget)
        if settled * 100 >= pct * limit  # integers: exact at every boundary
    ]
    if (standing.hard and standing.refused) or settled >= limit:
        due.append((Kind.EXHAUSTED.value, 0, _exhausted_message(budget, standing)))
    return due


def budget_alerts_record(standings: Sequence[BudgetStanding], *, at: datetime) -> list[int]:
    """Record the threshold and exhausted alerts the standings call for; new delivery ids.

    Each alert happens once per (budget, kind, period, threshold): calling this
    again, or from several workers at once, records nothing new. Standings
    without a counter (settled_nanos None) are skipped until it is seeded.
    """
    counted = [s for s in standings if s.settled_nanos is not None]
    if not counted:
        return []
    budgets = Budget.objects.select_related("org", "team", "key").in_bulk(
        {s.budget_id for s in counted}
    )
    existing = set(
        Alert.objects.filter(
            budget_id__in=list(budgets), period_id__in={s.period_id for s in counted}
        ).values_list("budget_id", "kind", "period_id", "threshold")
    )
    delivery_ids: list[int] = []
    for standing in counted:
        budget = budgets.get(standing.budget_id)
        if budget is None:
            continue  # deleted since the standing was read
        for kind, pct, message in _budget_alerts_due(budget, standing, at):
            if (budget.pk, kind, standing.period_id, pct) in existing:
                continue
            lookup = {"budget": budget, "kind": kind, "period_id": standing.period_id}
            values = {
                "org_id": budget.org_id,
                "spend_nanos": standing.settled_nanos,
                "limit_nanos": standing.limit_nanos,
                "message": message,
            }
            delivery_ids += _alert_record(
                {**lookup, "threshold": pct},
                values,
                lambda alert, b=budget, s=standing: _budget_payload(alert, b, s, at),
            )
    return delivery_ids


async def abudget_alerts_check(*, counters: BudgetCounters, at: datetime) -> list[int]:
    """Read every budget's standing from `counters` and record its alerts; new delivery ids."""
    standings = await abudget_standings(counters=counters, at=at)
    return await in_thread(budget_alerts_record, standings, at=at)


# ---------------------------------------------------------------- spend spikes


def spike_period_id(at: datetime) -> str:
    """The UTC clock hour a spike alert belongs to: `h2026-11-21T14`."""
    return f"h{hour_floor(at):%Y-%m-%dT%H}"


def _spike_message(org: Organization, spend: int, baseline: int, hours: int, at: datetime) -> str:
    span = "7 days" if hours * HOUR == SPIKE_BASELINE else f"{hours} hours"
    if baseline > 0:
        ratio = (Decimal(spend) / Decimal(baseline)).quantize(Decimal("0.1"), ROUND_HALF_UP)
        versus = f"{ratio}x the hourly average of {usd(baseline)} over the previous {span}"
    else:
        versus = f"against no spend in the previous {span}"
    return one_line(
        f"Spend spike in {org.name}: {usd(spend)} in the 60 minutes to "
        f"{_local(at, org.time_zone)}, {versus}."
    )


def _spike_payload(alert: Alert, org: Organization, hours: int, at: datetime) -> dict[str, Any]:
    return {
        "id": alert.pk,
        "event": alert.kind,
        "created_at": _iso(alert.created_at),
        "message": alert.message,
        "org": {"id": org.pk, "slug": org.slug, "name": org.name},
        "window": {"start": _iso(at - HOUR), "end": _iso(at)},
        "spend_nanos": alert.spend_nanos,
        "spend_usd": str(usd_cents(alert.spend_nanos)),
        "baseline_nanos": alert.baseline_nanos,
        "baseline_usd": str(usd_cents(alert.baseline_nanos)),
        "baseline_hours": hours,
        "multiplier": str(settings.TOLLGATE_SPIKE_MULTIPLIER),
    }


def spend_spikes_detect(*, at: datetime) -> list[int]:
    """Record a spike alert for each org whose last 60 minutes ran far above its baseline.

    The last hour is read from raw events (rollups lag); the baseline is the mean
    hourly spend over the previous 7 days of complete hours, from hourly rollups,
    counted from the org's first usage when that is more recent. A spike needs
    spend >= TOLLGATE_SPIKE_MULTIPLIER x baseline and >= TOLLGATE_SPIKE_MIN_USD,
    and at least 24 hours of history. Once per org per clock hour; new delivery ids.
    """
    window_start = at - HOUR
    min_nanos = int(
        (settings.TOLLGATE_SPIKE_MIN_USD * NANOS_PER_USD).to_integral_value(ROUND_HALF_UP)
    )
    recent = (
        UsageEvent.objects.filter(started_at__gte=window_start, started_at__lt=at)
        .values("org_id")
        .annotate(total=Sum("cost_nanos"))
        .order_by()
    )
    spends = {
        row["org_id"]: int(row["total"])
        for row in recent
        if row["total"] and row["total"] >= min_nanos
    }
    if not spends:
        return []
    baseline_end = hour_floor(window_start)
    baseline_start = baseline_end - SPIKE_BASELINE
    history = (
        UsageRollup.objects.filter(
            granularity=RollupMeasures.Granularity.HOUR,
            org_id__in=spends,
            bucket_start__lt=baseline_end,
        )
        .values("org_id")
        .annotate(
            first=Min("bucket_start"),
            total=Sum("cost_nanos", filter=Q(bucket_start__gte=baseline_start)),
        )
        .order_by()
    )
    multiplier: Decimal = settings.TOLLGATE_SPIKE_MULTIPLIER
    orgs = Organization.objects.in_bulk(spends)
    period_id = spike_period_id(at)
    delivery_ids: list[int] = []
    for row in history:
        org, spend = orgs.get(row["org_id"]), spends[row["org_id"]]
        if org is None or row["first"] > baseline_end - SPIKE_MIN_HISTORY:
            continue
        # Hours with no rollup row spent nothing: they count, as zero, from the first one.
        hours = (baseline_end - max(row["first"], baseline_start)) // HOUR
        total = int(row["total"] or 0)
        # spend >= multiplier x (total / hours), without dividing: exact.
        if spend * hours < multiplier * total:
            continue
        baseline = int((Decimal(total) / hours).to_integral_value(ROUND_HALF_UP))
        delivery_ids += _alert_record(
            {"org": org, "kind": Kind.SPIKE, "period_id": period_id},
            {
                "spend_nanos": spend,
                "baseline_nanos": baseline,
                "message": _spike_message(org, spend, baseline, hours, at),
            },
            lambda alert, o=org, h=hours: _spike_payload(alert, o, h, at),
        )
    return delivery_ids


# ---------------------------------------------------------------- delivery


def alert_retry_delay(attempts: int) -> timedelta:
    """Wait before the next attempt after `attempts` failed ones: doubling, at most an hour."""
    base = timedelta(seconds=settings.TOLLGATE_ALERT_RETRY_BASE_SECONDS)
    return min(base * 2 ** max(0, attempts - 1), MAX_BACKOFF)


def _claim(delivery_id: int, now: datetime) -> bool:
    """Take a due delivery for one attempt; False when it is not due or someone has it.

    One conditional UPDATE: of two workers (a Celery retry and the sweep, say)
    only one moves `next_attempt_at` on, so one attempt is made at a time.
    """
    claimed = AlertDelivery.objects.filter(
        pk=delivery_id, status=Status.PENDING, next_attempt_at__lte=now
    ).update(attempts=F("attempts") + 1, next_attempt_at=now + ATTEMPT_LEASE)
    return claimed == 1


def alert_body(alert: Alert) -> bytes:
    """The exact bytes a webhook receives (and signs over): the alert's payload as JSON."""
    return json.dumps(alert.payload, separators=(",", ":"), sort_keys=True).encode()


def _webhook_send(delivery: AlertDelivery) -> tuple[int | None, str]:
    try:
        secret = delivery.channel.secret()
    except SecretUnreadable:
        return None, "the signing secret cannot be decrypted (encryption key missing)"
    if not secret:
        return None, "the channel has no signing secret: rotate it in the admin"
    body = alert_body(delivery.alert)
    result = webhook_post(
        delivery.channel.url,
        body,
        headers={
            SIGNATURE_HEADER: webhook_signature(secret, int(timezone.now().timestamp()), body),
            "X-Tollgate-Event": delivery.alert.kind,
            "X-Tollgate-Delivery": str(delivery.pk),
        },
        allow_private=settings.TOLLGATE_WEBHOOK_ALLOW_PRIVATE_NETWORKS,
        timeout_s=WEBHOOK_TIMEOUT_S,
    )
    return result.status, result.error


def _email_send(delivery: AlertDelivery) -> tuple[int | None, str]:
    alert = delivery.alert
    recipients = recipients_parse(delivery.channel.recipients)
    if not recipients:
        return None, "the channel has no recipients"
    subject = one_line(f"[Tollgate] {alert.get_kind_display()}: {alert.org.name}")
    body = (
        f"{alert.message}\n\n"
        f"Organization: {alert.org.name} ({alert.org.slug})\n"
        f"Alert: {alert.kind} #{alert.pk}, period {alert.period_id}\n"
    )
    try:
        send_mail(subject, body, settings.DEFAULT_FROM_EMAIL, recipients, fail_silently=False)
    except Exception as exc:  # SMTP errors, refused connections, a misconfigured backend
        return None, f"sending the e-mail failed ({type(exc).__name__})"
    return None, ""


def _send(delivery: AlertDelivery) -> tuple[int | None, str]:
    """One attempt: (HTTP status or None, error or "")."""
    if not delivery.channel.enabled:
        return None, "the channel is disabled"
    if delivery.channel.kind == AlertChannel.Kind.WEBHOOK:
        return _webhook_send(delivery)
    return _email_send(delivery)


def alert_delivery_attempt(delivery_id: int) -> bool:
    """Send one delivery if it is due and nobody else is sending it; True once it is delivered.

    Records the attempt: delivered, or the error and when to try again
    (exponential backoff), or failed after TOLLGATE_ALERT_MAX_ATTEMPTS attempts.
    A delivered delivery is never sent again.
    """
    claimed = _claim(delivery_id, timezone.now())
    delivery = (
        AlertDelivery.objects.select_related("alert", "alert__org", "channel")
        .filter(pk=delivery_id)
        .first()
    )
    if delivery is None:
        return False
    if not claimed:
        return delivery.status == Status.DELIVERED
    status, error = _send(delivery)
    now = timezone.now()
    changes: dict[str, Any] = {"response_status": status, "last_error": error[:300]}
    if not error:
        changes.update(status=Status.DELIVERED, delivered_at=now, next_attempt_at=None)
        logger.info("Alert %s delivered to channel %s", delivery.alert_id, delivery.channel_id)
    elif delivery.attempts >= settings.TOLLGATE_ALERT_MAX_ATTEMPTS or not delivery.channel.enabled:
        changes.update(status=Status.FAILED, next_attempt_at=None)
        logger.warning(
            "Alert delivery %s failed for good after %d attempt(s): %s",
            delivery.pk, delivery.attempts, error,
        )  # fmt: skip
    else:
        changes["next_attempt_at"] = now + alert_retry_delay(delivery.attempts)
        logger.info(
            "Alert delivery %s attempt %d failed: %s", delivery.pk, delivery.attempts, error
        )
    AlertDelivery.objects.filter(pk=delivery.pk, status=Status.PENDING).update(**changes)
    return not error


def alert_delivery_next_at(delivery_id: int) -> datetime | None:
    """When a still-pending delivery is due next; None once it is delivered, failed or gone."""
    pending = AlertDelivery.objects.filter(pk=delivery_id, status=Status.PENDING)
    return pending.values_list("next_attempt_at", flat=True).first()


def alert_deliveries_due(*, at: datetime, limit: int = 500) -> list[int]:
    """Pending deliveries whose next attempt is due at `at`, oldest first."""
    due = AlertDelivery.objects.filter(status=Status.PENDING, next_attempt_at__lte=at)
    return list(due.order_by("next_attempt_at").values_list("pk", flat=True)[:limit])


def alert_deliveries_run_due(*, at: datetime | None = None) -> int:
    """Attempt every due delivery here and now (the embedded default has no Celery)."""
    at = at or timezone.now()
    return sum(alert_delivery_attempt(delivery_id) for delivery_id in alert_deliveries_due(at=at))


# ---------------------------------------------------------------- channels


def webhook_secret_generate() -> str:
    """A new signing secret: 256 random bits."""
    return "whsec_" + secrets.token_urlsafe(32)


def channel_facts(channel: AlertChannel) -> dict[str, Any]:
    """What the audit log may show of a channel: the URL's host only (its path may carry
    a receiver's token), never the secret."""
    return {
        "name": channel.name,
        "kind": channel.kind,
        "host": urlsplit(channel.url).hostname or "",
        "recipients": recipients_parse(channel.recipients),
        "enabled": channel.enabled,
        "notify_threshold": channel.notify_threshold,
        "notify_exhausted": channel.notify_exhausted,
        "notify_spike": channel.notify_spike,
    }


PRIVATE_URL_REFUSAL = (
    "This URL reaches a loopback, private, link-local or reserved address; webhooks go to "
    "public hosts only."
)


def webhook_url_check(url: str) -> None:
    """Refuse, when a channel is saved, a webhook URL that reaches our own network (SSRF),
    so the admin hears at once; every delivery checks again (DNS may change)."""
    if settings.TOLLGATE_WEBHOOK_ALLOW_PRIVATE_NETWORKS:
        return
    host = urlsplit(url).hostname
    if host and host_is_private(host):
        raise ValidationError({"url": PRIVATE_URL_REFUSAL})


@transaction.atomic
def alert_channel_create(*, channel: AlertChannel, actor: Actor) -> str:
    """Save a new channel; a webhook gets a fresh signing secret, returned to show once."""
    secret = webhook_secret_generate() if channel.kind == AlertChannel.Kind.WEBHOOK else ""
    channel.set_secret(secret)
    channel.full_clean()
    if channel.kind == AlertChannel.Kind.WEBHOOK:
        webhook_url_check(channel.url)
    channel.save()
    audit_record(
        actor=actor,
        org=channel.org,
        action="alert_channel.create",
        target=channel,
        after=channel_facts(channel),
    )
    return secret


@transaction.atomic
def alert_channel_secret_rotate(*, channel: AlertChannel, actor: Actor) -> str:
    """Replace the channel's signing secret; the new one is returned to show once."""
    secret = webhook_secret_generate()
    channel.set_secret(secret)
    channel.save(update_fields=["secret_encrypted"])
    audit_record(actor=actor, org=channel.org, action="alert_channel.rotate_secret", target=channel)
    return secret
