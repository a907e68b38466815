"""Rollups: exact to the nano-dollar, late events folded in, reconciled, and raw events pruned."""

import importlib
import io
import logging
import random
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from django.core.management import call_command
from django.db.models import Count, Sum
from django.utils import timezone
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from billing.models import (
    ReconciliationRun,
    RollupState,
    UsageEvent,
    UsageRollup,
    UsageTagRollup,
    UsageTeamRollup,
)
from billing.reconciliation import rollups_reconcile, usage_events_prune
from billing.rollups import (
    COUNTERS,
    HISTOGRAM_EDGES_MS,
    histogram_bucket,
    histogram_percentile,
    rollups_rebuild,
    rollups_refresh,
)
from billing.selectors import usage_breakdown, usage_by_end_user, usage_series
from tenants.models import Organization, Team, VirtualKey
from tenants.services import virtual_key_issue
from tests.conftest import TEST_ACTOR
from tests.factories import OrganizationFactory, TeamFactory

pytestmark = pytest.mark.django_db

HOUR = timedelta(hours=1)
DAY = timedelta(days=1)
# Late on a UTC day, so a few hours of traffic cross into the next day.
T0 = datetime(2025, 3, 1, 22, 0, tzinfo=UTC)
Outcome = UsageEvent.Outcome
Granularity = UsageRollup.Granularity


def event(org: Organization, *, started_at: datetime = T0, **fields: Any) -> UsageEvent:
    values: dict[str, Any] = {
        "endpoint": "chat.completions",
        "model": "gpt-a",
        "provider_kind": "openai",
        "outcome": Outcome.SUCCESS,
        "status_code": 200,
        "input_tokens": 100,
        "output_tokens": 20,
        "cost_nanos": 140_000,
        "latency_ms": 350,
        **fields,
    }
    return UsageEvent.objects.create(
        id=uuid.uuid4(),
        org=org,
        started_at=started_at,
        finished_at=started_at + timedelta(milliseconds=values["latency_ms"] or 0),
        **values,
    )


def ingested_long_ago() -> None:
    """Mark every event as ingested an hour ago: the refresh task has no reason to revisit it."""
    UsageEvent.objects.update(ingested_at=timezone.now() - HOUR)


def totals(queryset: Any) -> dict[str, int]:
    sums = queryset.aggregate(
        **{name: Sum(name) for name in ("input_tokens", "output_tokens", "cost_nanos")}
    )
    return {name: int(value or 0) for name, value in sums.items()}


def ledger_totals(**filters: Any) -> dict[str, int]:
    events = UsageEvent.objects.filter(**filters)
    return {"requests": events.count(), **totals(events)}


def rollup_totals(granularity: str = Granularity.HOUR, **filters: Any) -> dict[str, int]:
    rows = UsageRollup.objects.filter(granularity=granularity, **filters)
    requests = rows.aggregate(n=Sum("requests"))["n"] or 0
    return {"requests": int(requests), **totals(rows)}


def team_rollup_totals(granularity: str = Granularity.HOUR, **filters: Any) -> dict[str, int]:
    rows = UsageTeamRollup.objects.filter(granularity=granularity, **filters)
    requests = rows.aggregate(n=Sum("requests"))["n"] or 0
    return {"requests": int(requests), **totals(rows)}


def rollup_snapshot() -> list[tuple[Any, ...]]:
    """Every rollup row's content, without ids and computation times."""
    fields = ["granularity", "bucket_start", "org_id", *COUNTERS]
    rows = [
        (model.__name__, *row)
        for model, extra in (
            (UsageRollup, ["model", "provider_kind", "team_id", "key_id", "endpoint"]),
            (UsageTagRollup, ["model", "provider_kind", "tag"]),
            (UsageTeamRollup, ["team_id"]),
        )
        for row in model.objects.values_list(
            *fields, *extra, "errors_by_class", "latency_histogram", "ttft_histogram"
        )
    ]
    return sorted(rows, key=repr)


# ---------------------------------------------------------------- exactness


EVENTS = st.lists(
    st.fixed_dictionaries(
        {
            "org": st.integers(0, 1),
            "team": st.integers(0, 2),
            "model": st.sampled_from(["gpt-a", "gpt-b", "claude-c"]),
            "outcome": st.sampled_from(list(Outcome)),
            "error_class": st.sampled_from(["", "upstream_timeout", "invalid_request"]),
            "minute": st.integers(0, 4 * 60 - 1),  # 22:00 to 02:00, across midnight
            "input_tokens": st.integers(0, 10**9),
            "output_tokens": st.integers(0, 10**7),
            "cost_nanos": st.integers(0, 10**13),
            "latency_ms": st.none() | st.integers(0, 200_000),
            "ttft_ms": st.none() | st.integers(0, 50_000),
            "priced": st.booleans(),
            "tags": st.lists(
                st.sampled_from(["a", "b", "feature:search"]), max_size=3, unique=True
            ),
        }
    ),
    max_size=30,
)


@settings(
    max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(specs=EVENTS)
def test_rollup_totals_equal_the_sum_of_event_costs_to_the_nano(
    specs: list[dict[str, Any]],
) -> None:
    UsageEvent.objects.all().delete()
    UsageRollup.objects.all().delete()
    UsageTagRollup.objects.all().delete()
    UsageTeamRollup.objects.all().delete()
    RollupState.objects.all().delete()
    orgs = list(Organization.objects.order_by("pk")[:2])
    while len(orgs) < 2:
        orgs.append(OrganizationFactory())
    teams = [None, *(TeamFactory(org=orgs[0]) for _ in range(2))]
    for spec in specs:
        org = orgs[spec.pop("org")]
        team = teams[spec.pop("team")]
        started_at = T0 + timedelta(minutes=spec.pop("minute"), seconds=17)
        event(org, started_at=started_at, team=team if team and team.org == org else None, **spec)

    rollups_refresh()

    for org in orgs:
        assert rollup_totals(org=org) == ledger_totals(org=org)
        for team in teams:
            assert team_rollup_totals(org=org, team_id=team and team.pk) == ledger_totals(
                org=org, team=team
            )
        for day in (T0.replace(hour=0), T0.replace(hour=0) + DAY):
            in_day = {"bucket_start__gte": day, "bucket_start__lt": day + DAY}
            assert rollup_totals(Granularity.DAY, org=org, **in_day) == ledger_totals(
                org=org, started_at__gte=day, started_at__lt=day + DAY
            )
            assert rollup_totals(Granularity.HOUR, org=org, **in_day) == rollup_totals(
                Granularity.DAY, org=org, **in_day
            )
    failed = UsageEvent.objects.exclude(outcome=Outcome.SUCCESS).count()
    rows = UsageRollup.objects.filter(granularity=Granularity.HOUR)
    assert sum(row.errors for row in rows) == failed
    assert sum(sum(row.errors_by_class.values()) for row in rows) == failed
    assert sum(sum(row.latency_histogram) for row in rows) == (
        UsageEvent.objects.filter(latency_ms__isnull=False).count()
    )
    assert (
        sum(row.unpriced_requests for row in rows)
        == UsageEvent.objects.filter(priced=False).count()
    )
    team_rows = UsageTeamRollup.objects.filter(granularity=Granularity.HOUR)
    for measure in ("errors_by_class", "latency_histogram", "ttft_histogram"):
        assert sum_measure(team_rows, measure) == sum_measure(rows, measure)
    tagged_cost = sum(e.cost_nanos * len(e.tags) for e in UsageEvent.objects.all())
    tag_rows = UsageTagRollup.objects.filter(granularity=Granularity.HOUR)
    assert sum(row.cost_nanos for row in tag_rows) == tagged_cost


def sum_measure(rows: Any, measure: str) -> dict[object, int]:
    """Error classes or histogram buckets of `rows` added up, as {class or bucket: count}."""
    total: dict[object, int] = {}
    for row in rows:
        value = getattr(row, measure)
        for name, count in value.items() if isinstance(value, dict) else enumerate(value):
            if count:
                total[name] = total.get(name, 0) + count
    return total


def test_a_late_event_is_folded_into_its_hour_and_day_on_the_next_run(org: Organization) -> None:
    event(org, started_at=T0 + timedelta(minutes=5), cost_nanos=1_000)
    event(org, started_at=T0 + 3 * HOUR, cost_nanos=2_000)
    ingested_long_ago()
    rollups_refresh()
    assert rollup_totals(bucket_start=T0)["cost_nanos"] == 1_000

    # Ingested now, for a request made hours ago (a stream backlog, a retried batch).
    event(org, started_at=T0 + timedelta(minutes=40), cost_nanos=30_000)
    rollups_refresh()

    hour = UsageRollup.objects.get(granularity=Granularity.HOUR, bucket_start=T0)
    assert (hour.requests, hour.cost_nanos) == (2, 31_000)
    day = UsageRollup.objects.get(granularity=Granularity.DAY, bucket_start=T0.replace(hour=0))
    assert (day.requests, day.cost_nanos) == (2, 31_000)
    assert rollup_totals() == ledger_totals()


def test_rebuilding_again_changes_nothing(org: Organization, team: Team) -> None:
    key = virtual_key_issue(org=org, team=team, name="k", actor=TEST_ACTOR).key
    for minute in range(0, 240, 7):
        event(
            org, started_at=T0 + timedelta(minutes=minute), key=key, team=team,
            latency_ms=minute * 13, ttft_ms=minute, tags=["a", "b"][: minute % 3],
            outcome=Outcome.UPSTREAM_ERROR if minute % 5 == 0 else Outcome.SUCCESS,
            error_class="upstream_timeout" if minute % 5 == 0 else "",
        )  # fmt: skip
    rollups_refresh()
    first = rollup_snapshot()
    rollups_refresh()
    rollups_rebuild(since=T0 - DAY, until=T0 + DAY)
    rollups_rebuild(since=None, until=None)

    assert rollup_snapshot() == first
    assert UsageRollup.objects.filter(granularity=Granularity.HOUR).count() == 4


def test_the_team_rollup_migration_backfills_rows_equal_to_a_rebuild(
    org: Organization, team: Team
) -> None:
    from django.apps import apps

    migration = importlib.import_module("billing.migrations.0008_team_rollups")
    for minute in range(0, 300, 11):
        event(
            org, started_at=T0 + timedelta(minutes=minute), team=team if minute % 2 else None,
            latency_ms=minute * 7, ttft_ms=minute or None,
            outcome=Outcome.CLIENT_ERROR if minute % 3 == 0 else Outcome.SUCCESS,
            error_class="invalid_request" if minute % 3 == 0 else "",
        )  # fmt: skip
    rollups_refresh()
    rebuilt = rollup_snapshot()
    UsageTeamRollup.objects.all().delete()
    # Raw events may be pruned by the time the migration runs: it reads rollups only.
    UsageEvent.objects.all().delete()

    migration.team_rollups_backfill(apps, None)

    assert rollup_snapshot() == rebuilt
    assert UsageTeamRollup.objects.filter(granularity=Granularity.DAY).count() == 4


def test_the_refresh_rebuilds_only_hours_that_gained_events(org: Organization) -> None:
    event(org, started_at=T0)
    event(org, started_at=T0 + 2 * HOUR)
    ingested_long_ago()
    rollups_refresh()
    # Nobody edits rollups; this only shows which hours the next run touches.
    UsageRollup.objects.filter(bucket_start=T0).update(cost_nanos=7)

    event(org, started_at=T0 + 2 * HOUR + timedelta(minutes=1))
    rollups_refresh()

    assert UsageRollup.objects.get(granularity=Granularity.HOUR, bucket_start=T0).cost_nanos == 7
    assert rollup_totals(bucket_start=T0 + 2 * HOUR)["requests"] == 2


def test_an_event_with_two_tags_counts_once_under_each_tag_and_once_in_totals(
    org: Organization,
) -> None:
    event(org, tags=["feature:search", "team:growth"], cost_nanos=1_000)
    event(org, tags=["feature:search"], cost_nanos=10_000)
    event(org, cost_nanos=100_000)
    rollups_refresh()

    by_tag = {
        row.label: (row.requests, row.cost_nanos)
        for row in usage_breakdown(org_id=org.pk, since=T0, until=T0 + HOUR, by="tag")
    }
    assert by_tag == {"feature:search": (2, 11_000), "team:growth": (1, 1_000)}
    (everything,) = usage_breakdown(org_id=org.pk, since=T0, until=T0 + HOUR)
    assert (everything.requests, everything.cost_nanos) == (3, 111_000)


# ---------------------------------------------------------------- percentiles


def true_percentile(values: list[int], percentile: int) -> int:
    ordered = sorted(values)
    rank = -(-percentile * len(ordered) // 100)
    return ordered[max(rank, 1) - 1]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_percentiles_from_merged_histograms_are_within_one_bucket_of_the_truth(
    org: Organization, seed: int
) -> None:
    rng = random.Random(seed)
    latencies = [int(rng.lognormvariate(6, 1.2)) for _ in range(400)]
    for index, latency in enumerate(latencies):
        # Spread over hours and models, so the answer merges many rows.
        event(
            org, started_at=T0 + timedelta(minutes=index), latency_ms=latency,
            model=rng.choice(["gpt-a", "gpt-b"]), ttft_ms=latency // 3,
        )  # fmt: skip
    rollups_refresh()

    (summary,) = usage_breakdown(org_id=org.pk, since=T0, until=T0 + 2 * DAY)
    for percentile, estimate in (
        (50, summary.latency_p50_ms), (95, summary.latency_p95_ms), (99, summary.latency_p99_ms),
    ):  # fmt: skip
        truth = true_percentile(latencies, percentile)
        assert estimate is not None
        assert abs(histogram_bucket(int(estimate)) - histogram_bucket(truth)) <= 1, (
            percentile, estimate, truth,
        )  # fmt: skip
    ttft_truth = true_percentile([latency // 3 for latency in latencies], 95)
    assert summary.ttft_p95_ms is not None
    assert abs(histogram_bucket(int(summary.ttft_p95_ms)) - histogram_bucket(ttft_truth)) <= 1
    assert summary.latency_mean_ms == pytest.approx(sum(latencies) / len(latencies))


def test_histogram_buckets_cover_every_latency() -> None:
    assert HISTOGRAM_EDGES_MS[0] == 0
    for value in (0, 1, 9, 10, 11, 999, 12_345, 3_600_000, 10**9):
        index = histogram_bucket(value)
        assert HISTOGRAM_EDGES_MS[index] <= value
        assert index == len(HISTOGRAM_EDGES_MS) - 1 or value < HISTOGRAM_EDGES_MS[index + 1]
    assert histogram_percentile([], 50) is None


# ---------------------------------------------------------------- reconciliation


def test_reconciliation_records_a_clean_run(org: Organization) -> None:
    event(org)
    ingested_long_ago()
    rollups_refresh()

    run = rollups_reconcile(since=T0.replace(hour=0), until=T0.replace(hour=0) + DAY)

    assert run.status == ReconciliationRun.Status.CLEAN
    assert run.mismatches == [] and run.days_checked == 1


def test_reconciliation_detects_a_tampered_rollup_alerts_and_repairs_it(
    org: Organization, caplog: pytest.LogCaptureFixture
) -> None:
    event(org, cost_nanos=5_000, tags=["a"])
    event(org, started_at=T0 + HOUR, cost_nanos=6_000)
    ingested_long_ago()
    rollups_refresh()
    UsageRollup.objects.filter(granularity=Granularity.HOUR, bucket_start=T0).update(
        cost_nanos=5_001
    )
    UsageTagRollup.objects.filter(granularity=Granularity.DAY).update(requests=9)
    UsageTeamRollup.objects.filter(granularity=Granularity.HOUR, bucket_start=T0).update(
        output_tokens=21
    )
    stray = UsageRollup.objects.get(granularity=Granularity.DAY)
    stray.pk, stray.bucket_start = None, stray.bucket_start + DAY  # a day without events
    stray.save()

    with caplog.at_level(logging.ERROR, logger="billing.reconciliation"):
        run = rollups_reconcile(since=T0 - DAY, until=T0 + 2 * DAY)

    assert run.status == ReconciliationRun.Status.REPAIRED
    figures = {
        (m["day"], m["source"], m["figure"], m["events"], m["rollups"]) for m in run.mismatches
    }
    assert {
        ("2025-03-01", "hour rollups", "cost_nanos", 11_000, 11_001),  # per org and day
        ("2025-03-01", "day tag rollups", "requests", 1, 9),
        ("2025-03-01", "hour team rollups", "output_tokens", 40, 41),
        ("2025-03-02", "day rollups", "requests", 0, 2),
        ("2025-03-02", "day rollups", "cost_nanos", 0, 11_000),
    } <= figures
    assert {day for day, *_ in figures} == {"2025-03-01", "2025-03-02"}
    assert any("differ from the raw events" in r.getMessage() for r in caplog.records)
    assert rollup_totals() == ledger_totals()
    assert rollup_totals(Granularity.DAY) == ledger_totals()
    assert team_rollup_totals() == team_rollup_totals(Granularity.DAY) == ledger_totals()
    assert rollups_reconcile(since=T0 - DAY, until=T0 + 2 * DAY).status == "clean"


# ---------------------------------------------------------------- retention


@pytest.fixture
def retention_30_days(settings: Any) -> None:
    settings.TOLLGATE_USAGE_RETENTION_DAYS = 30


def test_retention_deletes_only_old_events_and_keeps_their_rollups(
    org: Organization, retention_30_days: None
) -> None:
    now = timezone.now()
    old = now - timedelta(days=40)
    recent = now - timedelta(days=10)
    event(org, started_at=old, cost_nanos=1_111)
    event(org, started_at=old + timedelta(minutes=1), cost_nanos=2_222, tags=["a"])
    event(org, started_at=recent, cost_nanos=3_333)
    ingested_long_ago()
    # Not rolled up yet: pruning must roll the old day up first, then check it.

    result = usage_events_prune(now=now)

    assert (result.days, result.events, result.blocked_on) == (1, 2, None)
    assert list(UsageEvent.objects.values_list("cost_nanos", flat=True)) == [3_333]
    assert rollup_totals()["cost_nanos"] == 1_111 + 2_222 + 3_333
    assert rollup_totals(Granularity.DAY)["cost_nanos"] == 1_111 + 2_222 + 3_333
    run = ReconciliationRun.objects.get(trigger=ReconciliationRun.Trigger.RETENTION)
    assert run.status == ReconciliationRun.Status.CLEAN

    # The pruned day's rollups survive every later rebuild and reconciliation.
    rollups_rebuild(since=None, until=None)
    rollups_refresh()
    assert rollup_totals()["cost_nanos"] == 1_111 + 2_222 + 3_333
    assert rollups_reconcile(since=old - DAY, until=now).status == "clean"
    assert usage_events_prune(now=now).events == 0


def test_retention_repairs_a_wrong_rollup_before_deleting_the_events(
    org: Organization, retention_30_days: None
) -> None:
    old = timezone.now() - timedelta(days=45)
    event(org, started_at=old, cost_nanos=4_000)
    ingested_long_ago()
    rollups_refresh()
    UsageRollup.objects.update(cost_nanos=1)

    usage_events_prune()

    assert not UsageEvent.objects.exists()
    assert rollup_totals()["cost_nanos"] == 4_000
    assert ReconciliationRun.objects.get().status == ReconciliationRun.Status.REPAIRED


def test_an_event_arriving_for_a_pruned_day_never_wipes_its_rollups(
    org: Organization, retention_30_days: None, caplog: pytest.LogCaptureFixture
) -> None:
    old = timezone.now() - timedelta(days=45)
    event(org, started_at=old, cost_nanos=4_000)
    ingested_long_ago()
    usage_events_prune()

    event(org, started_at=old + timedelta(minutes=1), cost_nanos=50)
    with caplog.at_level(logging.ERROR, logger="billing.rollups"):
        result = rollups_refresh()

    assert result.pruned_hours_skipped == 1
    assert rollup_totals()["cost_nanos"] == 4_000
    assert "already pruned" in caplog.text


# ---------------------------------------------------------------- reports and commands


def test_breakdowns_name_teams_keys_and_deployments(org: Organization) -> None:
    team = TeamFactory(org=org, name="Search")
    key: VirtualKey = virtual_key_issue(org=org, team=team, name="indexer", actor=TEST_ACTOR).key
    event(org, team=team, key=key, deployment_id=7, deployment_name="east", cost_nanos=9)
    event(org, cost_nanos=1, end_user="customer-42")
    event(org, cost_nanos=2, end_user="customer-42", started_at=T0 + DAY)
    rollups_refresh()
    window = {"org_id": org.pk, "since": T0 - DAY, "until": T0 + 2 * DAY}

    assert [(r.label, r.cost_nanos) for r in usage_breakdown(**window, by="team")] == [
        ("Search", 9), ("(none)", 1 + 2),
    ]  # fmt: skip
    assert usage_breakdown(**window, by="key")[0].label == f"indexer ({key.prefix})"
    assert usage_breakdown(**window, by="deployment")[0].label == "east"
    days = usage_series(**window, granularity=Granularity.DAY)
    assert [(point.key, point.requests) for point in days] == [
        (T0.replace(hour=0), 2), (T0.replace(hour=0) + DAY, 1),
    ]  # fmt: skip
    (customer,) = usage_by_end_user(**window)
    assert (customer.end_user, customer.requests, customer.cost_nanos) == ("customer-42", 2, 3)
    with pytest.raises(ValueError, match="Unknown breakdown"):
        usage_breakdown(**window, by="colour")


def test_a_window_that_cuts_days_reads_hours_at_its_edges(org: Organization) -> None:
    for hours in range(0, 30):
        event(org, started_at=T0 + hours * HOUR, cost_nanos=10**hours % 997 + 1)
    rollups_refresh()
    since, until = T0 + 3 * HOUR, T0 + 29 * HOUR  # 01:00 on day 2 to 03:00 on day 3

    (summary,) = usage_breakdown(org_id=org.pk, since=since, until=until)

    expected = ledger_totals(started_at__gte=since, started_at__lt=until)
    assert (summary.requests, summary.cost_nanos) == (expected["requests"], expected["cost_nanos"])


def test_recompute_command_shows_progress_and_a_summary(org: Organization) -> None:
    event(org, started_at=T0)
    event(org, started_at=T0 + 2 * HOUR)
    out = io.StringIO()

    call_command("rollups_recompute", "--since", "2025-03-01", "--until", "2025-03-03", stdout=out)

    lines = out.getvalue().splitlines()
    assert lines[:2] == ["1/2 hours", "2/2 hours"]
    assert "Rebuilt 2 hour(s) and 2 day(s)" in lines[-1]
    assert rollup_totals() == ledger_totals()

    out = io.StringIO()
    call_command("rollups_recompute", "--all", stdout=out)
    *progress, summary = out.getvalue().splitlines()
    done, total = progress[-1].removesuffix(" hours").split("/")
    assert done == total and summary.startswith("Rebuilt")
    assert rollup_totals(Granularity.DAY) == ledger_totals()


def test_recompute_command_refuses_unclear_ranges() -> None:
    from django.core.management.base import CommandError

    with pytest.raises(CommandError, match="either --since"):
        call_command("rollups_recompute")
    with pytest.raises(CommandError, match="ISO date"):
        call_command("rollups_recompute", "--since", "yesterday")


def test_the_rollup_tasks_are_registered_and_scheduled() -> None:
    from django.conf import settings as django_settings

    from gatewaysite.celery import app

    app.loader.import_default_modules()
    scheduled = {entry["task"] for entry in django_settings.CELERY_BEAT_SCHEDULE.values()}
    for name in (
        "billing.rollups_refresh",
        "billing.rollups_reconcile",
        "billing.usage_events_prune",
    ):
        assert name in scheduled
        assert name in app.tasks
    assert app.tasks["billing.rollups_refresh"].apply().get()["hours"] == 0


def test_rollup_counts_match_the_events_per_org(org: Organization) -> None:
    other = OrganizationFactory()
    event(org, cost_nanos=5)
    event(other, cost_nanos=10**12)
    rollups_refresh()

    per_org = dict(
        UsageRollup.objects.filter(granularity=Granularity.HOUR)
        .values_list("org_id")
        .annotate(n=Count("id"))
    )
    assert per_org == {org.pk: 1, other.pk: 1}
    (mine,) = usage_breakdown(org_id=org.pk, since=T0, until=T0 + HOUR)
    assert mine.cost_nanos == 5
