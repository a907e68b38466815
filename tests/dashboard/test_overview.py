"""The overview page: scoped to the viewer's organizations, money shown in dollars."""

import json
import uuid
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from billing.contracts import TokenUsage, UsageRecord
from billing.ingest import usage_events_write
from billing.models import UsageEvent
from billing.rollups import rollups_refresh
from tenants.models import Membership, VirtualKey
from tenants.services import Actor, budget_create
from tests.factories import OrganizationFactory, TeamFactory, UserFactory
from tests.support.dashboard import signed_in_as

pytestmark = pytest.mark.django_db


def spend(org, cost_nanos: int, *, model: str = "gpt-4o-mini", when: datetime | None = None):
    when = when or timezone.now()
    usage_events_write([
        UsageRecord(
            event_id=uuid.uuid4(), org_id=org.pk, team_id=None, key_id=None,
            endpoint="chat.completions", model=model, outcome="success", status_code=200,
            started_at=when, finished_at=when, usage=TokenUsage(input_tokens=10, output_tokens=5),
            cost_nanos=cost_nanos,
        )
    ])  # fmt: skip


def signed_in(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


def test_anonymous_visitors_are_sent_to_sign_in() -> None:
    response = Client().get(reverse("dashboard:overview"))
    assert response.status_code == 302
    assert response["location"] == f"{reverse('dashboard:sign_in')}?next=/dashboard/"


def test_member_sees_their_orgs_spend_in_dollars(django_assert_max_num_queries) -> None:
    org = OrganizationFactory(name="Initech")
    user = UserFactory()
    Membership.objects.create(user=user, org=org, role=Membership.Role.FINANCE)
    spend(org, 1_234_567_890)  # $1.23456789
    spend(org, 5_000_000, model="gpt-4o")
    client = signed_in(user)
    with django_assert_max_num_queries(10):
        response = client.get(reverse("dashboard:overview"))
    assert response.status_code == 200
    page = response.content.decode()
    assert "Initech" in page
    assert "$1.24" in page  # today's spend, rounded only on screen
    assert "gpt-4o-mini" in page and "gpt-4o" in page


def test_other_orgs_are_invisible_and_unreachable() -> None:
    mine, theirs = OrganizationFactory(name="Mine"), OrganizationFactory(name="Theirs")
    user = UserFactory()
    Membership.objects.create(user=user, org=mine, role=Membership.Role.MEMBER)
    spend(theirs, 9_990_000_000, model="their-secret-model")
    client = signed_in(user)

    page = client.get(reverse("dashboard:overview")).content.decode()
    assert "Theirs" not in page and "their-secret-model" not in page
    assert client.get(reverse("dashboard:overview"), {"org": theirs.slug}).status_code == 404


def test_user_without_an_org_gets_guidance() -> None:
    response = signed_in(UserFactory()).get(reverse("dashboard:overview"))
    assert response.status_code == 200
    assert "not a member of any organization" in response.content.decode()


def test_today_follows_the_orgs_time_zone() -> None:
    org = OrganizationFactory(time_zone="Pacific/Auckland")
    user = UserFactory()
    Membership.objects.create(user=user, org=org, role=Membership.Role.OWNER)
    local_midnight = (
        timezone.now().astimezone(org_zone(org)).replace(hour=0, minute=0, second=0, microsecond=0)
    )
    spend(org, 2_000_000_000, when=(local_midnight - timedelta(minutes=1)).astimezone(UTC))
    spend(org, 3_000_000_000, when=(local_midnight + timedelta(minutes=1)).astimezone(UTC))
    response = signed_in(user).get(reverse("dashboard:overview"))
    assert response.context["today"].cost_nanos == 3_000_000_000


def org_zone(org):
    from zoneinfo import ZoneInfo

    return ZoneInfo(org.time_zone)


# ---------------------------------------------------------------- charts, tops, budgets, live


def event(org, *, cost_nanos: int = 1_000_000, when: datetime | None = None, team=None,
          key=None, model: str = "gpt-4o-mini", outcome: str = "success",
          latency_ms: int | None = 200, ttft_ms: int | None = None) -> UsageRecord:  # fmt: skip
    when = when or timezone.now()
    return UsageRecord(
        event_id=uuid.uuid4(), org_id=org.pk, team_id=team.pk if team else None,
        key_id=key.pk if key else None, endpoint="chat.completions", model=model,
        outcome=outcome, status_code=200 if outcome == "success" else 502, started_at=when,
        finished_at=when, usage=TokenUsage(input_tokens=10, output_tokens=5),
        cost_nanos=cost_nanos, latency_ms=latency_ms, ttft_ms=ttft_ms,
    )  # fmt: skip


def overview(client: Client, org, **query):
    response = client.get(reverse("dashboard:overview"), {"org": org.slug, **query})
    assert response.status_code == 200
    return response


def tile(response, testid: str) -> str:
    page = response.content.decode()
    start = page.index(f'data-testid="{testid}"')
    return page[page.index(">", start) + 1 : page.index("<", start)]


def make_keys(org, team, count: int) -> list[VirtualKey]:
    return VirtualKey.objects.bulk_create(
        VirtualKey(
            org=org,
            team=team,
            name=f"key {n}",
            prefix=f"tgk_{team.pk}_{n:04d}",
            secret_hash=f"{n:064d}",
        )  # fmt: skip
        for n in range(count)
    )


def test_figures_are_exact_before_and_after_the_rollup_job_runs() -> None:
    org = OrganizationFactory(time_zone="UTC")
    client = signed_in_as("owner", org)
    now = timezone.now()
    earlier = [event(org, cost_nanos=3_000_000_000, when=now - timedelta(hours=h)) for h in (2, 3)]
    usage_events_write(earlier)
    rollups_refresh(now=now)
    # Written after the rollup job ran, into an hour it already built: still counted once.
    latest = [
        event(org, cost_nanos=7_000_000_000),
        event(org, cost_nanos=1, outcome="upstream_error"),
    ]
    usage_events_write(latest)

    figures = overview(client, org).context["usage"]
    assert figures.period.requests == 4 and figures.period.errors == 1
    assert figures.period.cost_nanos == 13_000_000_001
    assert sum(bucket.figures.cost_nanos for bucket in figures.series) == 13_000_000_001
    rollups_refresh()
    assert overview(client, org).context["usage"].period == figures.period


def test_today_and_this_month_start_at_local_midnight_off_the_hour() -> None:
    # Kathmandu is UTC+5:45: its midnight falls at :15 past a UTC hour.
    org = OrganizationFactory(time_zone="Asia/Kathmandu")
    client = signed_in_as("finance", org)
    midnight = (
        timezone.now()
        .astimezone(ZoneInfo(org.time_zone))
        .replace(hour=0, minute=0, second=0, microsecond=0)
    )
    usage_events_write([
        event(org, cost_nanos=2_000_000_000, when=midnight - timedelta(minutes=5)),
        event(org, cost_nanos=3_000_000_000, when=midnight + timedelta(minutes=5)),
    ])  # fmt: skip
    rollups_refresh()
    response = overview(client, org)
    assert response.context["today"].cost_nanos == 3_000_000_000
    assert response.context["today"].requests == 1
    assert tile(response, "spend-today") == "$3.00"
    assert tile(response, "requests-today") == "1"


def test_the_period_picker_switches_between_hours_and_days() -> None:
    org = OrganizationFactory()
    client = signed_in_as("admin", org)
    usage_events_write([event(org, when=timezone.now() - timedelta(days=20)), event(org)])
    rollups_refresh()
    day = overview(client, org)
    assert len(day.context["usage"].series) == 24 and day.context["usage"].period.requests == 1
    page = day.content.decode()
    for label in ("24 hours", "7 days", "30 days"):
        assert f">{label}</a>" in page
    assert len(overview(client, org, period="7d").context["usage"].series) == 7 * 24
    month = overview(client, org, period="30d").context["usage"]
    assert len(month.series) == 30 and month.period.requests == 2
    assert overview(client, org, period="nonsense").context["period"].slug == "24h"


def test_charts_get_their_data_as_json_with_a_table_for_screen_readers() -> None:
    org = OrganizationFactory()
    usage_events_write([event(org, latency_ms=300, ttft_ms=120, cost_nanos=2_500_000)])
    page = overview(signed_in_as("owner", org), org).content.decode()
    data = json.loads(
        page.split('id="overview-chart" type="application/json">')[1].split("</script>")[0]
    )
    assert sum(data["requests"]) == 1 and sum(data["spend_nanos"]) == 2_500_000
    assert len(data["t"]) == 24 and any(value for value in data["ttft_p50_ms"])
    assert 'id="chart-table"' in page and "uPlot-1.6.32.iife.min.js" in page


def test_a_member_sees_only_their_teams_figures_and_costliest_keys() -> None:
    org = OrganizationFactory()
    mine, other = TeamFactory(org=org), TeamFactory(org=org, name="Other team")
    (my_key,) = make_keys(org, mine, 1)
    (their_key,) = make_keys(org, other, 1)
    their_key.name = "their-secret-key"
    their_key.save()
    usage_events_write([
        event(org, team=mine, key=my_key, cost_nanos=1_000_000_000),
        event(org, team=other, key=their_key, cost_nanos=9_000_000_000, model="their-model"),
    ])  # fmt: skip
    member = overview(signed_in_as("member", org, team=mine), org)
    page = member.content.decode()
    assert tile(member, "spend-today") == "$1.00" and tile(member, "requests-today") == "1"
    assert "their-model" not in page and "their-secret-key" not in page
    assert 'id="top-teams"' not in page
    admin = overview(signed_in_as("admin", org), org)
    assert tile(admin, "spend-today") == "$10.00"
    assert [top.label for top in admin.context["usage"].top_teams] == ["Other team", mine.name]


def test_a_member_without_a_team_is_told_to_ask_for_one() -> None:
    org = OrganizationFactory()
    usage_events_write([event(org, cost_nanos=5_000_000_000)])
    page = overview(signed_in_as("member", org), org).content.decode()
    assert "You are not on a team yet" in page and "$5.00" not in page


def test_a_new_org_is_shown_how_to_start() -> None:
    org = OrganizationFactory()
    response = overview(signed_in_as("owner", org), org)
    page = response.content.decode()
    assert "No requests yet" in page
    assert f'href="{reverse("dashboard:keys_new")}?org={org.slug}"' in page
    assert tile(response, "requests-today") == "0" and tile(response, "spend-today") == "$0.00"
    # The live feed is there, empty, waiting for the first request.
    assert 'id="live-feed"' in page and 'id="live-status"' in page and "data-event-id" not in page


def test_the_live_feed_starts_with_the_latest_requests() -> None:
    org = OrganizationFactory()
    sent = event(org, model="gpt-4o")
    usage_events_write([sent])
    page = overview(signed_in_as("finance", org), org).content.decode()
    assert f'data-event-id="{sent.event_id}"' in page
    assert f"/dashboard/ws/live/?org={org.slug}" in page


# Budget standings read the counters through async_to_sync, which hands the test's
# connection to another thread: these tests need real transactions.
@pytest.mark.django_db(transaction=True)
def test_spend_tiles_are_measured_against_the_orgs_budgets() -> None:
    org = OrganizationFactory()
    actor = Actor.system("tests")
    budget_create(org=org, scope="org", limit_nanos=250 * 10**9, period="monthly", actor=actor)
    budget_create(org=org, scope="org", limit_nanos=10 * 10**9, period="daily", actor=actor)
    usage_events_write([event(org, cost_nanos=5 * 10**9)])
    page = overview(signed_in_as("admin", org), org).content.decode()
    assert "of $250.00 monthly budget" in page and "of $10.00 daily budget" in page
    assert 'id="overview-budgets"' in page and "50.0%" in page  # $5 of the $10 daily budget


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_a_month_of_usage_for_hundreds_of_keys_renders_in_a_few_queries(
    django_assert_max_num_queries,
) -> None:
    org = OrganizationFactory()
    teams = TeamFactory.create_batch(3, org=org)
    keys = [key for team in teams for key in make_keys(org, team, 100)]
    now = timezone.now()
    budget_create(org=org, scope="org", limit_nanos=10**12, actor=Actor.system("tests"))
    usage_events_write([
        event(org, team=teams[n % 3], key=key, when=now - timedelta(days=day, hours=n % 5),
              cost_nanos=1_000 + n, latency_ms=100 + n, model=f"model-{n % 7}")
        for day in range(31) for n, key in enumerate(keys)
    ])  # fmt: skip
    rollups_refresh()
    usage_events_write([event(org, team=teams[0], key=keys[0], cost_nanos=5)])  # not rolled up
    client = signed_in_as("owner", org)
    for period in ("24h", "7d", "30d"):
        # Sign-in 3, usage 7 (rollup state, rollup rows, month sum, raw events, team and
        # key names, live feed), budgets 5 (standings read and seeded from the ledger).
        with django_assert_max_num_queries(16):
            response = overview(client, org, period=period)
        usage = response.context["usage"]
        assert len(usage.top_keys) == 5 and len(usage.top_teams) == 3
        month = UsageEvent.objects.filter(
            org=org, started_at__gte=response.context["month"].start_at
        )
        assert usage.month_cost_nanos == sum(month.values_list("cost_nanos", flat=True))
