"""Budget alerts: once per threshold per period, signed webhooks and e-mail, retried, spikes."""

import asyncio
import json
import os
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import redis.asyncio
from django.conf import settings as django_settings
from django.core import mail
from django.core.exceptions import ValidationError
from django.db import connections
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from billing.alert_tasks import alert_deliver, budget_alerts_check
from billing.alerts import (
    abudget_alerts_check,
    alert_channel_create,
    alert_deliveries_due,
    alert_deliveries_run_due,
    alert_delivery_attempt,
    budget_alerts_record,
    spend_spikes_detect,
    webhook_signature,
    webhook_signature_verify,
)
from billing.budget_counters import BudgetLine, RedisBudgetCounters
from billing.budget_ledger import budget_line_at
from billing.budget_standing import BudgetStanding
from billing.ingest import usage_events_write
from billing.models import Alert, AlertChannel, AlertDelivery
from billing.rollups import rollups_refresh
from billing.webhooks import address_is_public
from tenants.models import Budget, Organization, Team
from tenants.services import budget_create
from tests.conftest import TEST_ACTOR
from tests.factories import OrganizationFactory, TeamFactory, UserFactory
from tests.support.budgets import HARNESS_KINDS, budget_harness
from tests.support.gateway import celery_process, database_env, wait_until
from tests.support.ledger import record_usage, usage_event
from tests.support.processes import free_port
from tests.support.webhooks import webhook_receiver

pytestmark = pytest.mark.django_db

USD = 10**9
CENT = USD // 100
# 15:30 in Berlin; the monthly period is November 2026 (Berlin time).
AT = datetime(2026, 11, 21, 14, 30, tzinfo=UTC)
Kind = Alert.Kind
Status = AlertDelivery.Status
COUNTER_PARTS = ("settled", "reserved", "holds", "amounts", "refused")


@pytest.fixture
def berlin() -> Organization:
    return OrganizationFactory(name="Acme", time_zone="Europe/Berlin")


@pytest.fixture
def search(berlin: Organization) -> Team:
    return TeamFactory(org=berlin, name="search")


@pytest.fixture
def budget(berlin: Organization, search: Team) -> Budget:
    return budget_create(
        org=berlin, scope=Budget.Scope.TEAM, team=search, limit_nanos=100 * USD,
        soft_thresholds=(50, 80, 100), actor=TEST_ACTOR,
    )  # fmt: skip


@pytest.fixture
def allow_loopback(settings) -> None:  # type: ignore[no-untyped-def]
    """The receivers below listen on 127.0.0.1, which production refuses."""
    settings.TOLLGATE_WEBHOOK_ALLOW_PRIVATE_NETWORKS = True


def standing_of(
    budget: Budget, settled: int | None, *, at: datetime = AT, refused: bool = False
) -> BudgetStanding:
    """What `abudget_standings` reports for the budget when its counter holds `settled`."""
    line = budget_line_at(budget, at)
    window = line.window
    return BudgetStanding(
        budget_id=budget.pk, org_id=budget.org_id, period_id=line.period_id,
        period_start=window.start_at, period_end=window.end_at, limit_nanos=budget.limit_nanos,
        hard=line.hard, settled_nanos=settled, reserved_nanos=0, refused=refused,
        measured_from=window.start_at if window.end_at is not None else budget.created_at,
    )  # fmt: skip


def webhook_channel(org: Organization, url: str, **fields: object) -> tuple[AlertChannel, str]:
    channel = AlertChannel(org=org, name="ops hook", kind=AlertChannel.Kind.WEBHOOK, url=url)
    for name, value in fields.items():
        setattr(channel, name, value)
    secret = alert_channel_create(channel=channel, actor=TEST_ACTOR)
    return channel, secret


def email_channel(org: Organization, recipients: str, **fields: object) -> AlertChannel:
    channel = AlertChannel(
        org=org, name="finance mail", kind=AlertChannel.Kind.EMAIL, recipients=recipients
    )
    for name, value in fields.items():
        setattr(channel, name, value)
    alert_channel_create(channel=channel, actor=TEST_ACTOR)
    return channel


def alerts_of(budget: Budget) -> list[tuple[str, str, int]]:
    rows = Alert.objects.filter(budget=budget).order_by("period_id", "kind", "threshold")
    return list(rows.values_list("kind", "period_id", "threshold"))


# ---------------------------------------------------------------- thresholds, once per period


def test_each_threshold_alerts_once_per_period_with_a_readable_message(
    budget: Budget, berlin: Organization
) -> None:
    hook, _ = webhook_channel(berlin, "https://hooks.example.com/tollgate")
    inbox = email_channel(berlin, "finance@example.com, cto@example.com")
    email_channel(berlin, "spikes-only@example.com", notify_threshold=False)
    email_channel(berlin, "off@example.com", enabled=False)
    email_channel(OrganizationFactory(), "other-org@example.com")

    # One nano short of 50 %: integers, so the boundary is exact.
    assert budget_alerts_record([standing_of(budget, 50 * USD - 1)], at=AT) == []
    first = budget_alerts_record([standing_of(budget, 50 * USD)], at=AT)
    assert alerts_of(budget) == [("threshold", "m2026-11", 50)]
    assert sorted(AlertDelivery.objects.filter(pk__in=first).values_list("channel", flat=True)) == [
        hook.pk,
        inbox.pk,
    ]
    # Evaluated again and again (every 15 s), nothing new.
    for _ in range(3):
        assert budget_alerts_record([standing_of(budget, 60 * USD)], at=AT) == []

    budget_alerts_record([standing_of(budget, 80 * USD + 12 * CENT)], at=AT)
    alert = Alert.objects.get(budget=budget, threshold=80)
    assert alert.message.startswith(
        "Team 'search' monthly budget reached 80% ($80.12 of $100.00); "
        "resets 2026-12-01 00:00 Europe/Berlin."
    )
    assert "At this rate it runs out 2026-11-2" in alert.message
    assert (alert.spend_nanos, alert.limit_nanos, alert.org_id) == (
        80_120_000_000,
        100 * USD,
        berlin.pk,
    )
    payload = alert.payload
    assert payload["id"] == alert.pk and payload["event"] == "threshold"
    assert payload["threshold_pct"] == 80 and payload["spend_usd"] == "80.12"
    assert payload["budget"]["team"] == {"id": budget.team_id, "name": "search"}
    assert payload["period"]["id"] == "m2026-11"
    assert payload["period"]["end"] == "2026-11-30T23:00:00+00:00"  # Berlin midnight
    assert payload["forecast"]["projected_nanos"] > 100 * USD
    assert payload["forecast"]["exhausted_at"].startswith("2026-11-2")
    assert AlertDelivery.objects.count() == 4  # two alerts, two channels each


def test_a_new_period_alerts_again(budget: Budget) -> None:
    budget_alerts_record([standing_of(budget, 55 * USD)], at=AT)
    budget_alerts_record([standing_of(budget, 55 * USD)], at=AT)
    # 00:30 on 1 December in Berlin is still 30 November in UTC: the org's calendar counts.
    december = datetime(2026, 11, 30, 23, 30, tzinfo=UTC)
    budget_alerts_record([standing_of(budget, 51 * USD, at=december)], at=december)
    budget_alerts_record([standing_of(budget, 52 * USD, at=december)], at=december)
    assert alerts_of(budget) == [("threshold", "m2026-11", 50), ("threshold", "m2026-12", 50)]


def test_every_threshold_crossed_at_once_alerts_and_exhaustion_alerts_too(budget: Budget) -> None:
    budget_alerts_record([standing_of(budget, 100 * USD + 1)], at=AT)
    assert alerts_of(budget) == [
        ("exhausted", "m2026-11", 0),
        ("threshold", "m2026-11", 50),
        ("threshold", "m2026-11", 80),
        ("threshold", "m2026-11", 100),
    ]
    exhausted = Alert.objects.get(budget=budget, kind=Kind.EXHAUSTED)
    assert exhausted.message == (
        "Team 'search' monthly budget exhausted ($100.00 of $100.00); requests are refused "
        "until it resets 2026-12-01 00:00 Europe/Berlin."
    )
    budget_alerts_record([standing_of(budget, 130 * USD, refused=True)], at=AT)
    assert len(alerts_of(budget)) == 4


def test_a_hard_budget_that_refused_a_request_alerts_exhausted_below_its_limit(
    budget: Budget, berlin: Organization
) -> None:
    budget_alerts_record([standing_of(budget, 99 * USD + 50 * CENT, refused=True)], at=AT)
    assert ("exhausted", "m2026-11", 0) in alerts_of(budget)
    assert Alert.objects.get(kind=Kind.EXHAUSTED).message.startswith(
        "Team 'search' monthly budget refused a request: $99.50 of $100.00 spent"
    )

    soft = budget_create(
        org=berlin, scope=Budget.Scope.ORG, limit_nanos=10 * USD, period=Budget.Period.DAILY,
        enforcement=Budget.Enforcement.SOFT, soft_thresholds=(), actor=TEST_ACTOR,
    )  # fmt: skip
    # A soft budget never refuses; the flag alone means nothing for it.
    budget_alerts_record([standing_of(soft, 9 * USD, refused=True)], at=AT)
    assert alerts_of(soft) == []
    budget_alerts_record([standing_of(soft, 12 * USD)], at=AT)
    assert alerts_of(soft) == [("exhausted", "d2026-11-21", 0)]
    assert Alert.objects.get(budget=soft).message == (
        "Organization 'Acme' daily budget exhausted ($12.00 of $10.00); a soft limit, so "
        "requests still pass; resets 2026-11-22 00:00 Europe/Berlin."
    )


def test_a_budget_without_a_counter_yet_is_skipped(budget: Budget) -> None:
    assert budget_alerts_record([standing_of(budget, None)], at=AT) == []
    assert not Alert.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_concurrent_evaluations_record_each_alert_and_delivery_once(
    budget: Budget, berlin: Organization
) -> None:
    webhook_channel(berlin, "https://hooks.example.com/a")
    email_channel(berlin, "finance@example.com")
    standings = [standing_of(budget, 100 * USD)]
    workers = 8
    barrier = threading.Barrier(workers)
    results: list[list[int]] = []
    errors: list[BaseException] = []

    def evaluate() -> None:
        try:
            barrier.wait()
            results.append(budget_alerts_record(standings, at=AT))
        except BaseException as exc:  # reported below, in the test's thread
            errors.append(exc)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=evaluate) for _ in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    # 50, 80, 100 % and exhausted, each once, each to both channels once.
    assert Alert.objects.count() == 4
    created = [delivery_id for ids in results for delivery_id in ids]
    assert sorted(created) == sorted(AlertDelivery.objects.values_list("pk", flat=True))
    assert len(created) == 8


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("kind", HARNESS_KINDS)
def test_standings_read_from_the_budget_counters_alert_once(kind: str, budget: Budget) -> None:
    async def evaluate_as_the_check_does() -> None:
        async with budget_harness(kind) as harness:
            at, counters = harness.clock.at, harness.counters
            line = budget_line_at(budget, at)
            # No counter yet this period: nothing to judge.
            assert await abudget_alerts_check(counters=counters, at=at) == []
            await counters.seed(line, 80 * USD)
            await abudget_alerts_check(counters=counters, at=at)
            # A request needing more than the $20 left is refused: the budget is exhausted.
            refused = await counters.reserve("big-request", [line], 30 * USD, ttl_s=60)
            assert not refused.admitted
            await abudget_alerts_check(counters=counters, at=at)
            assert await abudget_alerts_check(counters=counters, at=at) == []

    asyncio.run(evaluate_as_the_check_does())
    assert alerts_of(budget) == [
        ("exhausted", "m2025-06", 0),
        ("threshold", "m2025-06", 50),
        ("threshold", "m2025-06", 80),
    ]


async def _counter_set(line: BudgetLine, settled_nanos: int | None) -> None:
    """Seed the line's counter in Redis (None: delete it), as the proxy's settles would."""
    client = redis.asyncio.Redis.from_url(django_settings.REDIS_URL)
    try:
        if settled_nanos is None:
            await client.delete(*[f"{line.key_prefix}:{part}" for part in COUNTER_PARTS])
        else:
            await RedisBudgetCounters(client).seed(line, settled_nanos)
    finally:
        await client.aclose()


@pytest.mark.django_db(transaction=True)
def test_the_scheduled_check_reads_redis_and_a_worker_delivers_what_it_records(
    budget: Budget, berlin: Organization, tmp_path: Path
) -> None:
    if not django_settings.REDIS_URL:
        pytest.skip("the scheduled check reads the counters in Redis (the embedded run has none)")
    email_channel(berlin, "finance@example.com")
    line = budget_line_at(budget, timezone.now())
    asyncio.run(_counter_set(line, 55 * USD))
    env = {
        **os.environ,
        **database_env(),
        "EMAIL_BACKEND": "django.core.mail.backends.filebased.EmailBackend",
        "EMAIL_FILE_PATH": str(tmp_path),
    }
    try:
        with celery_process("worker", "--concurrency", "1", "--loglevel", "WARNING", env=env):
            # What beat runs every TOLLGATE_ALERT_CHECK_SECONDS; it enqueues the delivery.
            budget_alerts_check.apply()
            delivery = wait_until(
                lambda: AlertDelivery.objects.filter(status=Status.DELIVERED).first(),
                timeout_s=60,
                what="a worker to e-mail the alert",
            )
    finally:
        asyncio.run(_counter_set(line, None))
    assert alerts_of(budget) == [("threshold", line.period_id, 50)]
    assert delivery.alert.threshold == 50 and delivery.attempts == 1


# ---------------------------------------------------------------- webhooks


def test_webhook_is_signed_and_a_receiver_verifies_it(
    budget: Budget, berlin: Organization, allow_loopback: None
) -> None:
    with webhook_receiver([200]) as receiver:
        channel, secret = webhook_channel(berlin, receiver.url)
        assert secret.startswith("whsec_") and len(secret) > 40
        assert secret not in channel.secret_encrypted
        (delivery_id,) = budget_alerts_record([standing_of(budget, 50 * USD)], at=AT)
        assert alert_delivery_attempt(delivery_id) is True
        # Delivered once, never again: a repeated task or sweep sends nothing.
        assert alert_delivery_attempt(delivery_id) is True
        assert alert_deliveries_run_due(at=timezone.now() + timedelta(days=1)) == 0
        (request,) = receiver.received()

    alert = Alert.objects.get()
    assert request.path == "/hooks/tollgate"
    assert request.headers["content-type"] == "application/json"
    assert request.headers["x-tollgate-event"] == "threshold"
    assert request.headers["x-tollgate-delivery"] == str(delivery_id)
    assert json.loads(request.body) == alert.payload
    header = request.headers["x-tollgate-signature"]
    assert webhook_signature_verify(secret, header, request.body)
    sent_at = int(header.split(",")[0].removeprefix("t="))
    assert abs(sent_at - time.time()) < 60
    assert header == webhook_signature(secret, sent_at, request.body)

    tampered = request.body.replace(b'"threshold_pct":50', b'"threshold_pct":5')
    assert tampered != request.body
    assert not webhook_signature_verify(secret, header, tampered)
    assert not webhook_signature_verify("whsec_someone-else", header, request.body)
    assert not webhook_signature_verify(secret, header, request.body, now=sent_at + 301)
    assert webhook_signature_verify(secret, header, request.body, now=sent_at + 299)
    assert not webhook_signature_verify(secret, "t=abc,v1=00", request.body)
    assert not webhook_signature_verify(secret, f"t={sent_at}", request.body)

    delivery = AlertDelivery.objects.get(pk=delivery_id)
    assert (delivery.status, delivery.attempts, delivery.response_status) == (
        Status.DELIVERED, 1, 200,
    )  # fmt: skip
    assert delivery.delivered_at is not None and delivery.next_attempt_at is None


def test_failed_webhooks_back_off_exponentially_and_give_up_after_the_last_attempt(
    budget: Budget,
    berlin: Organization,
    allow_loopback: None,
    settings,  # type: ignore[no-untyped-def]
) -> None:
    settings.TOLLGATE_ALERT_MAX_ATTEMPTS = 3
    settings.TOLLGATE_ALERT_RETRY_BASE_SECONDS = 30
    with webhook_receiver([500]) as receiver:
        webhook_channel(berlin, receiver.url)
        (delivery_id,) = budget_alerts_record([standing_of(budget, 50 * USD)], at=AT)
        delays = []
        for attempt in (1, 2, 3):
            before = timezone.now()
            assert alert_delivery_attempt(delivery_id) is False
            delivery = AlertDelivery.objects.get(pk=delivery_id)
            assert delivery.attempts == attempt
            assert (delivery.last_error, delivery.response_status) == ("HTTP 500", 500)
            if delivery.next_attempt_at is not None:
                delays.append(round((delivery.next_attempt_at - before).total_seconds()))
                # Not due yet: a second worker (or a duplicate task) sends nothing.
                assert alert_delivery_attempt(delivery_id) is False
                assert len(receiver.received()) == attempt
                assert alert_deliveries_due(at=timezone.now()) == []
                assert alert_deliveries_due(at=delivery.next_attempt_at) == [delivery_id]
                AlertDelivery.objects.filter(pk=delivery_id).update(next_attempt_at=timezone.now())
        assert delays == [30, 60]
        assert delivery.status == Status.FAILED and delivery.next_attempt_at is None
        assert alert_deliveries_run_due(at=timezone.now() + timedelta(days=1)) == 0
        assert len(receiver.received()) == 3


def test_redirects_are_not_followed(
    budget: Budget, berlin: Organization, allow_loopback: None
) -> None:
    with webhook_receiver([302]) as receiver:
        webhook_channel(berlin, receiver.url)
        (delivery_id,) = budget_alerts_record([standing_of(budget, 50 * USD)], at=AT)
        assert alert_delivery_attempt(delivery_id) is False
        assert len(receiver.received()) == 1
    delivery = AlertDelivery.objects.get(pk=delivery_id)
    assert delivery.last_error == "HTTP 302: redirects are not followed"
    assert delivery.status == Status.PENDING


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_webhooks_to_our_own_network_are_refused(
    budget: Budget, berlin: Organization, host: str
) -> None:
    assert django_settings.TOLLGATE_WEBHOOK_ALLOW_PRIVATE_NETWORKS is False
    with webhook_receiver([200]) as receiver:
        url = receiver.url.replace("127.0.0.1", host)
        with pytest.raises(ValidationError, match="public hosts only"):
            webhook_channel(berlin, url)  # refused when saved...
        # ...and when sent, for a channel whose host turned private after it was saved.
        channel = AlertChannel(org=berlin, name="ops hook", kind=AlertChannel.Kind.WEBHOOK, url=url)
        channel.set_secret("whsec-saved-before")
        channel.save()
        (delivery_id,) = budget_alerts_record([standing_of(budget, 50 * USD)], at=AT)
        assert alert_delivery_attempt(delivery_id) is False
        assert receiver.received() == []
    delivery = AlertDelivery.objects.get(pk=delivery_id)
    assert delivery.last_error == "refused: the host resolves to a non-public address"
    assert url not in delivery.last_error


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("169.254.169.254", False),  # cloud metadata
        ("10.1.2.3", False),
        ("172.16.0.1", False),
        ("192.168.1.1", False),
        ("100.64.0.1", False),  # carrier-grade NAT
        ("0.0.0.0", False),
        ("224.0.1.1", False),  # multicast
        ("240.0.0.1", False),  # reserved
        ("::1", False),
        ("::ffff:127.0.0.1", False),  # IPv4-mapped loopback
        ("64:ff9b::a00:1", False),  # NAT64 of 10.0.0.1
        ("2002:7f00:1::1", False),  # 6to4 of 127.0.0.1
        ("fe80::1%eth0", False),
        ("fd00::1", False),
        ("8.8.8.8", True),
        ("2606:4700:4700::1111", True),
    ],
)
def test_only_public_addresses_are_reachable_by_webhooks(address: str, public: bool) -> None:
    assert address_is_public(address) is public


@pytest.mark.parametrize(
    "url",
    ["ftp://hooks.example.com/x", "https://user:pw@hooks.example.com/x", "hooks.example.com/x",
     "https://hooks.example.com/x#frag", "javascript:alert(1)"],
)  # fmt: skip
def test_webhook_urls_must_be_http_without_credentials(berlin: Organization, url: str) -> None:

    with pytest.raises(ValidationError):
        webhook_channel(berlin, url)
    assert not AlertChannel.objects.exists()


# ---------------------------------------------------------------- e-mail


def test_email_alert_reaches_every_recipient(budget: Budget, berlin: Organization) -> None:
    email_channel(berlin, "finance@example.com,\n cto@example.com")
    (delivery_id,) = budget_alerts_record([standing_of(budget, 50 * USD)], at=AT)
    assert alert_delivery_attempt(delivery_id) is True
    (message,) = mail.outbox
    assert message.to == ["finance@example.com", "cto@example.com"]
    assert message.from_email == django_settings.DEFAULT_FROM_EMAIL
    assert message.subject == "[Tollgate] Budget threshold reached: Acme"
    assert message.body.startswith(
        "Team 'search' monthly budget reached 50% ($50.00 of $100.00); "
        "resets 2026-12-01 00:00 Europe/Berlin."
    )
    assert AlertDelivery.objects.get(pk=delivery_id).status == Status.DELIVERED


def test_email_that_cannot_be_sent_is_retried_later(
    budget: Budget,
    berlin: Organization,
    settings,  # type: ignore[no-untyped-def]
) -> None:
    settings.EMAIL_BACKEND = "django.core.mail.backends.smtp.EmailBackend"
    settings.EMAIL_HOST, settings.EMAIL_PORT = "127.0.0.1", free_port()  # nobody listens
    email_channel(berlin, "finance@example.com")
    (delivery_id,) = budget_alerts_record([standing_of(budget, 50 * USD)], at=AT)
    assert alert_delivery_attempt(delivery_id) is False
    delivery = AlertDelivery.objects.get(pk=delivery_id)
    assert delivery.status == Status.PENDING and delivery.attempts == 1
    assert delivery.last_error == "sending the e-mail failed (ConnectionRefusedError)"
    assert delivery.next_attempt_at > timezone.now()


def test_email_channels_need_valid_recipients(berlin: Organization) -> None:

    for recipients in ["", "finance@example.com, not-an-address"]:
        with pytest.raises(ValidationError):
            email_channel(berlin, recipients)


# ---------------------------------------------------------------- spend spikes


def usage_history(org: Organization, *, hours: int, cost_nanos: int, until: datetime) -> None:
    """One request an hour costing `cost_nanos`, in each of the `hours` hours before `until`."""
    usage_events_write([
        usage_event(org, until - timedelta(hours=back) + timedelta(minutes=10), cost_nanos)
        for back in range(1, hours + 1)
    ])  # fmt: skip


@pytest.mark.slow
def test_spend_spikes_alert_once_per_org_per_hour_against_the_recent_baseline() -> None:
    baseline_end = datetime(2026, 11, 21, 13, tzinfo=UTC)  # the hour before AT's window
    spiking = OrganizationFactory(name="Spiking")
    steady = OrganizationFactory(name="Steady")
    newcomer = OrganizationFactory(name="Newcomer")
    small = OrganizationFactory(name="Small")
    # Ten days of history, the older three at $5/h: only the last 7 days make the baseline.
    usage_history(spiking, hours=240, cost_nanos=50 * CENT, until=baseline_end)
    usage_events_write([
        usage_event(spiking, baseline_end - timedelta(hours=back, minutes=-20), 450 * CENT)
        for back in range(169, 241)
    ])  # fmt: skip
    usage_history(steady, hours=72, cost_nanos=50 * CENT, until=baseline_end)
    usage_history(newcomer, hours=20, cost_nanos=CENT, until=baseline_end)
    usage_history(small, hours=48, cost_nanos=CENT, until=baseline_end)
    rollups_refresh()
    # The last 60 minutes: 4x, 2.8x, far above a short history, and 50x but under $1.
    for org, cost in [(spiking, 200 * CENT), (steady, 140 * CENT), (newcomer, 500 * CENT),
                      (small, 50 * CENT)]:  # fmt: skip
        record_usage(org, AT - timedelta(minutes=20), cost // 2)
        record_usage(org, AT - timedelta(minutes=50), cost - cost // 2)
    webhook_channel(spiking, "https://hooks.example.com/spikes")
    email_channel(spiking, "ops@example.com", notify_spike=False)

    (delivery_id,) = spend_spikes_detect(at=AT)
    alert = Alert.objects.get()
    assert (alert.org, alert.kind, alert.period_id, alert.budget) == (
        spiking, Kind.SPIKE, "h2026-11-21T14", None,
    )  # fmt: skip
    assert (alert.spend_nanos, alert.baseline_nanos) == (2 * USD, 50 * CENT)
    assert alert.message == (
        "Spend spike in Spiking: $2.00 in the 60 minutes to 2026-11-21 14:30 UTC, 4.0x the "
        "hourly average of $0.50 over the previous 7 days."
    )
    assert alert.payload["baseline_hours"] == 168 and alert.payload["multiplier"] == "3"
    assert AlertDelivery.objects.get(pk=delivery_id).channel.kind == "webhook"

    # Later in the same clock hour: still spiking, no second alert.
    assert spend_spikes_detect(at=AT + timedelta(minutes=20)) == []
    # The next hour, still spiking: one more.
    record_usage(spiking, AT + timedelta(minutes=40), 2 * USD)
    spend_spikes_detect(at=AT + timedelta(minutes=45))
    assert list(Alert.objects.order_by("period_id").values_list("period_id", flat=True)) == [
        "h2026-11-21T14",
        "h2026-11-21T15",
    ]


def test_a_spike_baseline_counts_hours_from_the_first_usage_not_a_full_week() -> None:
    baseline_end = datetime(2026, 11, 21, 13, tzinfo=UTC)
    org = OrganizationFactory(name="Young")
    usage_history(org, hours=30, cost_nanos=USD, until=baseline_end)  # $1/h for 30 h
    rollups_refresh()
    # $2.90 is under 3x $1 (a week-long mean would be $0.18 and call it a spike).
    record_usage(org, AT - timedelta(minutes=5), 290 * CENT)
    assert spend_spikes_detect(at=AT) == []
    record_usage(org, AT - timedelta(minutes=4), 10 * CENT)
    spend_spikes_detect(at=AT)
    alert = Alert.objects.get()
    assert alert.baseline_nanos == USD and alert.payload["baseline_hours"] == 30
    assert "3.0x the hourly average of $1.00 over the previous 30 hours" in alert.message


# ---------------------------------------------------------------- admin


def test_admin_shows_the_signing_secret_once_and_never_lists_it(
    berlin: Organization,
) -> None:
    client = Client()
    client.force_login(UserFactory(is_staff=True, is_superuser=True))
    response = client.post(
        reverse("admin:billing_alertchannel_add"),
        {"org": berlin.pk, "name": "Ops", "kind": "webhook",
         "url": "https://hooks.example.com/t/abc", "recipients": "", "notify_threshold": "on",
         "notify_exhausted": "on", "notify_spike": "on", "enabled": "on"},
        follow=True,
    )  # fmt: skip
    assert response.status_code == 200
    channel = AlertChannel.objects.get(name="Ops")
    secret = channel.secret()
    assert secret.startswith("whsec_")
    assert secret.encode() in response.content  # the one time it is shown
    for page in [
        reverse("admin:billing_alertchannel_changelist"),
        reverse("admin:billing_alertchannel_change", args=[channel.pk]),
    ]:
        content = client.get(page).content
        assert secret.encode() not in content
        assert channel.secret_encrypted.encode() not in content

    rotated = client.post(
        reverse("admin:billing_alertchannel_changelist"),
        {"action": "rotate_secrets", "_selected_action": [channel.pk]},
        follow=True,
    )
    channel.refresh_from_db()
    assert channel.secret() != secret
    assert channel.secret().encode() in rotated.content
    header = webhook_signature(channel.secret(), int(time.time()), b"{}")
    assert not webhook_signature_verify(secret, header, b"{}")

    refused = client.post(
        reverse("admin:billing_alertchannel_add"),
        {"org": berlin.pk, "name": "Sneaky", "kind": "webhook",
         "url": "http://admin:pw@hooks.example.com/", "enabled": "on"},
    )  # fmt: skip
    assert refused.status_code == 200 and not AlertChannel.objects.filter(name="Sneaky").exists()


# ---------------------------------------------------------------- a real Celery worker


@pytest.fixture
def alert_worker() -> Iterator[str]:
    """A real Celery worker on a queue of this test's own; yields the queue name."""
    if not django_settings.REDIS_URL:
        pytest.skip("a real Celery worker needs Redis (the embedded run has no broker)")
    queue = f"alerts-test-{uuid.uuid4().hex[:8]}"
    env = {
        **os.environ,
        **database_env(),
        "TOLLGATE_ALERT_RETRY_BASE_SECONDS": "0.3",
        "TOLLGATE_WEBHOOK_ALLOW_PRIVATE_NETWORKS": "true",
    }
    args = ["worker", "-Q", queue, "--concurrency", "1", "--loglevel", "WARNING",
            "--hostname", f"{queue}@%h"]  # fmt: skip
    with celery_process(*args, env=env):
        yield queue


@pytest.mark.django_db(transaction=True)
def test_celery_worker_retries_a_failing_webhook_until_the_third_attempt_delivers(
    budget: Budget, berlin: Organization, alert_worker: str, allow_loopback: None
) -> None:
    with webhook_receiver([500, 500, 200]) as receiver:
        _, secret = webhook_channel(berlin, receiver.url)
        (delivery_id,) = budget_alerts_record([standing_of(budget, 50 * USD)], at=AT)
        alert_deliver.apply_async((delivery_id,), queue=alert_worker)

        def delivered() -> AlertDelivery | None:
            delivery = AlertDelivery.objects.get(pk=delivery_id)
            return delivery if delivery.status != Status.PENDING else None

        delivery = wait_until(delivered, timeout_s=60, what="the worker to deliver the alert")
        requests = receiver.received()

    assert (delivery.status, delivery.attempts, delivery.response_status) == (
        Status.DELIVERED, 3, 200,
    )  # fmt: skip
    assert delivery.last_error == ""
    assert len(requests) == 3
    for request in requests:
        assert request.headers["x-tollgate-delivery"] == str(delivery_id)
        assert webhook_signature_verify(
            secret, request.headers["x-tollgate-signature"], request.body
        )
    assert requests[0].body == requests[2].body
    # Backoff: 0.3 s before the second attempt, twice that before the third.
    assert requests[1].received_at - requests[0].received_at >= 0.3
    assert requests[2].received_at - requests[1].received_at >= 0.6
