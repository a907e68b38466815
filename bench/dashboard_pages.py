"""How fast the dashboard pages render with a month of usage for a few hundred keys.

Production-like: PostgreSQL (a scratch database this script creates and drops) and
Redis (budget counters). It seeds one organization with 10 teams, 300 keys each with a
budget, 30 days of usage events (150,000 by default) and their rollups, then renders
every main page in-process through Django's test client, several times each, and
writes the medians to bench/DASHBOARD.md. Server time only: no network, no browser.

    make bench-dashboard            # or: .venv/bin/python bench/dashboard_pages.py --events 150000
"""

import argparse
import os
import random
import statistics
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRATCH_DB = "tollgate_bench_dashboard"
PG_ROOT = "postgres://postgres@127.0.0.1:5432"
os.environ.update(
    DATABASE_URL=f"{PG_ROOT}/{SCRATCH_DB}",
    REDIS_URL=os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/9"),
    DEBUG="false",
    SECRET_KEY="bench-only-secret-key-0123456789abcdefghijklmnopqrstuvwxyz",
    TOLLGATE_ENCRYPTION_KEYS="YmVuY2gtb25seS1mZXJuZXQta2V5LTAxMjM0NTY3ODk=",
    ALLOWED_HOSTS="testserver",
    DJANGO_SETTINGS_MODULE="gatewaysite.settings",
)
sys.path.insert(0, str(REPO))

KEYS, TEAMS, DAYS, ROUNDS = 300, 10, 30, 7
# (model, nano-USD per input token, per output token): $0.15 per million tokens is 150.
MODELS = [("gpt-4o-mini", 150, 600), ("gpt-4o", 2_500, 10_000), ("claude-sonnet-4", 3_000, 15_000)]


def recreate_database() -> None:
    import psycopg

    with psycopg.connect(f"{PG_ROOT}/postgres", autocommit=True) as connection:
        connection.execute(f"DROP DATABASE IF EXISTS {SCRATCH_DB} WITH (FORCE)")
        connection.execute(f"CREATE DATABASE {SCRATCH_DB}")


def drop_database() -> None:
    import psycopg

    with psycopg.connect(f"{PG_ROOT}/postgres", autocommit=True) as connection:
        connection.execute(f"DROP DATABASE IF EXISTS {SCRATCH_DB} WITH (FORCE)")


def seed(events: int) -> tuple[object, object]:
    """The org, its admin, 300 keys with budgets, `events` usage events over 30 days."""
    from django.contrib.auth import get_user_model

    from billing.contracts import TokenUsage, UsageRecord
    from billing.ingest import usage_events_write
    from billing.rollups import rollups_refresh
    from tenants.models import Membership
    from tenants.services import (
        Actor,
        budget_create,
        organization_create,
        team_create,
        virtual_key_issue,
    )

    actor = Actor.system("bench")
    org = organization_create(slug="bench", name="Bench Corp", actor=actor)
    teams = [
        team_create(org=org, slug=f"team-{n}", name=f"Team {n}", actor=actor) for n in range(TEAMS)
    ]
    keys = []
    for n in range(KEYS):
        key = virtual_key_issue(
            org=org, team=teams[n % TEAMS], name=f"service-{n}", actor=actor
        ).key
        budget_create(org=org, scope="key", key=key, limit_nanos=50 * 10**9, actor=actor)
        keys.append(key)
    budget_create(org=org, scope="org", limit_nanos=20_000 * 10**9, actor=actor)
    admin = get_user_model().objects.create_user(username="bench-admin", password="x" * 20)
    Membership.objects.create(user=admin, org=org, role=Membership.Role.OWNER)

    rng = random.Random(7)
    now = datetime.now(UTC)
    start = now - timedelta(days=DAYS)
    span_s = int((now - start).total_seconds()) - 60
    batch: list[UsageRecord] = []
    for n in range(events):
        key = keys[rng.randrange(KEYS)]
        model, input_rate, output_rate = rng.choice(MODELS)
        at = start + timedelta(seconds=rng.randrange(span_s))
        usage = TokenUsage(input_tokens=rng.randint(50, 3_000), output_tokens=rng.randint(10, 800))
        failed = rng.random() < 0.02
        latency = rng.randint(120, 3_000)
        batch.append(
            UsageRecord(
                event_id=uuid.uuid4(),
                org_id=org.pk,
                team_id=key.team_id,
                key_id=key.pk,
                endpoint="chat.completions",
                model=model,
                outcome="upstream_error" if failed else "success",
                status_code=502 if failed else 200,
                started_at=at,
                finished_at=at + timedelta(milliseconds=latency),
                usage=usage,
                cost_nanos=usage.input_tokens * input_rate + usage.output_tokens * output_rate,
                deployment_name=f"{model}-primary",
                provider_kind="openai",
                upstream_model=model,
                latency_ms=latency,
                ttft_ms=rng.randint(60, 700),
                tags=(f"feature-{n % 7}",),
            )
        )
        if len(batch) == 5_000:
            usage_events_write(batch)
            batch.clear()
    usage_events_write(batch)
    rollups_refresh()
    return org, admin


def measure(org: object, admin: object) -> list[tuple[str, float, float, float, int]]:
    from django.db import connection, reset_queries
    from django.test import Client
    from django.test.utils import CaptureQueriesContext

    from billing.models import UsageEvent
    from tenants.models import Budget, VirtualKey

    client = Client()
    client.force_login(admin)
    today = datetime.now(UTC).date()
    month_ago = today - timedelta(days=30)
    key = VirtualKey.objects.filter(org=org).order_by("pk").first()
    budget = Budget.objects.filter(org=org, scope="org").first()
    event = UsageEvent.objects.filter(org=org).order_by("-started_at").first()
    pages = [
        ("Overview (24 hours)", "/dashboard/"),
        ("Overview (7 days)", "/dashboard/?period=7d"),
        ("Overview (30 days)", "/dashboard/?period=30d"),
        ("Keys", "/dashboard/keys/"),
        ("Key detail", f"/dashboard/keys/{key.pk}/"),
        ("Budgets (301)", "/dashboard/budgets/"),
        ("Budget detail", f"/dashboard/budgets/{budget.pk}/"),
        ("Request log", "/dashboard/requests/"),
        ("Request log, one key", f"/dashboard/requests/?key={key.pk}"),
        ("Request detail", f"/dashboard/requests/{event.pk}/"),
        (
            "Cost report, 30 days by key",
            f"/dashboard/reports/?since={month_ago}&until={today}&by=key",
        ),
        (
            "Cost report, 30 days by model",
            f"/dashboard/reports/?since={month_ago}&until={today}&by=model",
        ),
        ("Statements", "/dashboard/statements/"),
        ("Audit log", "/dashboard/audit/"),
        ("Providers & routes", "/dashboard/providers/"),
        ("Settings", "/dashboard/settings/"),
    ]
    results = []
    for label, url in pages:
        timings = []
        queries = 0
        for round_number in range(ROUNDS):
            reset_queries()
            with CaptureQueriesContext(connection) as captured:
                started = time.perf_counter()
                response = client.get(url)
                elapsed = (time.perf_counter() - started) * 1000
            if response.status_code != 200:
                raise SystemExit(f"{label}: {url} answered {response.status_code}")
            if round_number:  # the first round warms caches and templates
                timings.append(elapsed)
            queries = len(captured)
        results.append((label, statistics.median(timings), min(timings), max(timings), queries))
        print(f"{label:34} median {statistics.median(timings):7.1f} ms  ({queries} queries)")
    return results


def write_results(
    path: Path, events: int, results: list[tuple[str, float, float, float, int]]
) -> None:
    import django

    lines = [
        "# Dashboard page render times",
        "",
        f"Measured {datetime.now(UTC):%Y-%m-%d %H:%M} UTC by `bench/dashboard_pages.py` "
        f"on this machine ({os.cpu_count()} cores), Django {django.get_version()}, "
        "PostgreSQL + Redis.",
        f"Data: 1 organization, {TEAMS} teams, {KEYS} keys each with a budget, "
        f"{events:,} usage events over {DAYS} days, rolled up. Server time through "
        "Django's test client (no network, no browser), "
        f"{ROUNDS - 1} measured rounds after one warm-up.",
        "",
        "| page | median ms | min ms | max ms | queries |",
        "|---|---:|---:|---:|---:|",
        *[
            f"| {label} | {median:.1f} | {low:.1f} | {high:.1f} | {queries} |"
            for label, median, low, high, queries in results
        ],
        "",
    ]
    path.write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=150_000)
    parser.add_argument("--output", type=Path, default=REPO / "bench" / "DASHBOARD.md")
    parser.add_argument(
        "--keep", action="store_true", help="keep the scratch database (to profile a page)"
    )
    args = parser.parse_args()

    recreate_database()
    try:
        import django

        django.setup()
        import redis
        from django.conf import settings
        from django.core.management import call_command

        redis.Redis.from_url(settings.REDIS_URL).flushdb()
        call_command("migrate", verbosity=0)
        started = time.perf_counter()
        org, admin = seed(args.events)
        print(f"seeded {args.events:,} events in {time.perf_counter() - started:.0f} s")
        results = measure(org, admin)
        write_results(args.output, args.events, results)
        print(f"wrote {args.output}")
    finally:
        from django.db import connections

        connections.close_all()
        if not args.keep:
            drop_database()


if __name__ == "__main__":
    main()
