"""Scratch database, realistic seed and the usage/budget accounting check.

Runs in the harness process with Django set up against the scratch database
(`bench/proxy.py` sets the environment first). Nothing here runs during load.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

PG_ROOT = "postgres://postgres@127.0.0.1:5432"
SCRATCH_DB = "tollgate_bench_proxy"
TEAMS = 10
# Keys issued through the service (audit entries, full_clean); the rest are bulk-inserted
# with the same hashing (tenants.keys.generate_key): the service is ~5 queries per key.
SERVICE_KEYS = 40
# Never refuse during the run: ~100x what one core can push through one key.
KEY_RPM, KEY_TPM = 10_000_000, 1_000_000_000
ORG_RPM, ORG_TPM = 100_000_000, 2_000_000_000
KEY_BUDGET_NANOS = 1_000 * 10**9  # $1,000 a month per key
ORG_BUDGET_NANOS = 1_000_000 * 10**9
# USD per million tokens for every bench model (gpt-4o-mini's list price).
INPUT_USD, OUTPUT_USD = Decimal("0.15"), Decimal("0.60")


def recreate_database() -> None:
    import psycopg

    with psycopg.connect(f"{PG_ROOT}/postgres", autocommit=True) as connection:
        connection.execute(f"DROP DATABASE IF EXISTS {SCRATCH_DB} WITH (FORCE)")
        connection.execute(f"CREATE DATABASE {SCRATCH_DB}")


def drop_database() -> None:
    import psycopg

    with psycopg.connect(f"{PG_ROOT}/postgres", autocommit=True) as connection:
        connection.execute(f"DROP DATABASE IF EXISTS {SCRATCH_DB} WITH (FORCE)")


def bench_model(n: int) -> str:
    return f"bench-model-{n:03d}"


@dataclass(frozen=True)
class Seeded:
    org_id: int
    keys_total: int
    routes_total: int
    # The keys the load uses (plaintext, id), spread over the 10,000.
    bench_keys: list[tuple[str, int]] = field(default_factory=list)


def seed(*, mock_base_url: str, keys_total: int, routes_total: int, bench_keys: int) -> Seeded:
    """One org: teams, `keys_total` keys each with limits and a hard budget, an org budget
    and limits, `routes_total` routes to the mock, each with a price."""
    from django.db import transaction

    from billing.models import ModelPrice
    from routing.models import Deployment, Provider, Route
    from tenants.keys import generate_key
    from tenants.models import Budget, Organization, VirtualKey
    from tenants.services import (
        Actor,
        budget_create,
        organization_create,
        team_create,
        virtual_key_issue,
    )

    started = time.perf_counter()
    actor = Actor.system("bench")
    org = organization_create(slug="bench", name="Bench Corp", actor=actor)
    Organization.objects.filter(pk=org.pk).update(rpm_limit=ORG_RPM, tpm_limit=ORG_TPM)
    teams = [
        team_create(org=org, slug=f"team-{n}", name=f"Team {n}", actor=actor) for n in range(TEAMS)
    ]
    budget_create(org=org, scope=Budget.Scope.ORG, limit_nanos=ORG_BUDGET_NANOS, actor=actor)

    provider = Provider(org=org, name="Mock upstream", kind=Provider.Kind.MOCK)
    provider.base_url = mock_base_url
    provider.set_api_key("mock-provider-secret")
    provider.full_clean()
    provider.save()
    models = [bench_model(n) for n in range(routes_total)]
    with transaction.atomic():
        deployments = Deployment.objects.bulk_create(
            Deployment(provider=provider, name=f"mock-{model}", upstream_model=model)
            for model in models
        )
        routes = Route.objects.bulk_create(Route(org=org, model_name=model) for model in models)
        Route.deployments.through.objects.bulk_create(
            Route.deployments.through(route_id=route.pk, deployment_id=deployment.pk)
            for route, deployment in zip(routes, deployments, strict=True)
        )
        ModelPrice.objects.bulk_create(
            ModelPrice(
                org=None,
                provider_kind=Provider.Kind.MOCK,
                model=model,
                effective_from=datetime(2024, 1, 1, tzinfo=UTC),
                input_usd_per_mtok=INPUT_USD,
                output_usd_per_mtok=OUTPUT_USD,
                source=ModelPrice.Source.CATALOG,
            )
            for model in models
        )

    plaintexts: dict[int, str] = {}
    for n in range(min(SERVICE_KEYS, keys_total)):
        issued = virtual_key_issue(
            org=org, team=teams[n % TEAMS], name=f"service-{n:05d}", actor=actor,
            rpm_limit=KEY_RPM, tpm_limit=KEY_TPM, monthly_budget_nanos=KEY_BUDGET_NANOS,
        )  # fmt: skip
        plaintexts[n] = issued.plaintext
    with transaction.atomic():
        rows = []
        for n in range(SERVICE_KEYS, keys_total):
            generated = generate_key()
            plaintexts[n] = generated.plaintext
            rows.append(
                VirtualKey(
                    org=org,
                    team=teams[n % TEAMS],
                    name=f"service-{n:05d}",
                    prefix=generated.prefix,
                    secret_hash=generated.secret_hash,
                    rpm_limit=KEY_RPM,
                    tpm_limit=KEY_TPM,
                )  # fmt: skip
            )
        created = VirtualKey.objects.bulk_create(rows, batch_size=2_000)
        Budget.objects.bulk_create(
            (
                Budget(
                    org=org,
                    scope=Budget.Scope.KEY,
                    key=key,
                    period=Budget.Period.MONTHLY,
                    limit_nanos=KEY_BUDGET_NANOS,
                    enforcement=Budget.Enforcement.HARD,
                    soft_thresholds=[50, 80, 100],
                )  # fmt: skip
                for key in created
            ),
            batch_size=2_000,
        )
    ids = dict(
        VirtualKey.objects.filter(org=org).values_list("name", "pk")  # name -> id
    )
    # Spread over the range: some service-issued keys, most bulk-inserted ones.
    step = max(1, keys_total // bench_keys)
    chosen = [(n * step + 1) % keys_total for n in range(bench_keys)]
    used = [(plaintexts[n], ids[f"service-{n:05d}"]) for n in chosen]
    print(
        f"seeded {keys_total:,} keys, {routes_total} routes, budgets and limits "
        f"in {time.perf_counter() - started:.0f} s",
        flush=True,
    )
    return Seeded(org_id=org.pk, keys_total=keys_total, routes_total=routes_total, bench_keys=used)


def usage_event_count(org_id: int) -> int:
    from billing.models import UsageEvent

    return UsageEvent.objects.filter(org_id=org_id).count()


def wait_for_usage(org_id: int, answered: int, *, timeout_s: float) -> tuple[int, float]:
    """Poll the ledger until it holds at least `answered` events and has stopped growing
    (the requests in flight when wrk stopped come a little later, or never); (count, s)."""
    started = time.monotonic()
    count, last, last_change = 0, -1, started
    while time.monotonic() - started < timeout_s:
        count = usage_event_count(org_id)
        if count != last:
            last, last_change = count, time.monotonic()
        # The drain runs every 2 s: 6 s without change means the stream is empty.
        quiet_s = time.monotonic() - last_change
        if (count >= answered and quiet_s > 6) or quiet_s > 30:
            break
        time.sleep(1.0)
    return count, time.monotonic() - started


@dataclass
class BudgetCheck:
    budget: str
    counter_settled_nanos: int | None
    counter_reserved_nanos: int
    ledger_nanos: int
    events_cost_nanos: int

    @property
    def exact(self) -> bool:
        return (
            self.counter_settled_nanos == self.ledger_nanos == self.events_cost_nanos
            and self.counter_reserved_nanos == 0
        )


@dataclass
class Accounting:
    sent: int  # requests written to Tollgate, those in flight when wrk stopped included
    answered: int  # requests Tollgate answered (wrk's completed count + stream probes)
    events: int
    outcomes: dict[str, int]
    unpriced: int
    zero_cost_success: int
    budgets: list[BudgetCheck]
    drain_wait_s: float

    @property
    def events_match(self) -> bool:
        """Every answered request has its event, and nothing is counted twice.

        A request still in flight when wrk stopped has an event only if Tollgate read it
        before wrk closed the connection (otherwise it never started: ClientGone).
        """
        return self.answered <= self.events <= self.sent

    @property
    def budgets_exact(self) -> bool:
        return all(check.exact for check in self.budgets)

    @property
    def ok(self) -> bool:
        return (
            self.events_match
            and self.budgets_exact
            and self.unpriced == 0
            and self.zero_cost_success == 0
        )


def accounting_check(
    *, org_id: int, key_ids: list[int], sent: int, answered: int, redis_url: str,
    timeout_s: float = 120.0,
) -> Accounting:  # fmt: skip
    """Wait for the usage stream to drain, then compare ledger, counters and requests sent."""
    from django.db.models import Count, Sum

    from billing.models import UsageEvent

    events, waited = wait_for_usage(org_id, answered, timeout_s=timeout_s)
    ledger = UsageEvent.objects.filter(org_id=org_id)
    outcomes = dict(ledger.values_list("outcome").annotate(n=Count("id")).order_by())
    unpriced = ledger.filter(priced=False).count()
    zero_cost = ledger.filter(outcome=UsageEvent.Outcome.SUCCESS, cost_nanos=0).count()
    by_key = dict(
        ledger.filter(key_id__in=key_ids)
        .values_list("key_id")
        .annotate(total=Sum("cost_nanos"))
        .order_by()
    )
    org_total = ledger.aggregate(total=Sum("cost_nanos"))["total"] or 0
    rows = _budget_rows(org_id, key_ids)
    budgets = asyncio.run(_budget_checks(rows, by_key, org_total, redis_url))
    return Accounting(
        sent=sent, answered=answered, events=events, outcomes=outcomes, unpriced=unpriced,
        zero_cost_success=zero_cost, budgets=budgets, drain_wait_s=waited,
    )  # fmt: skip


def _budget_rows(org_id: int, key_ids: list[int]) -> list[tuple[Any, Any, int]]:
    """(budget, its current line, ledger spend) for the org budget and the used keys'."""
    from django.db.models import Q
    from django.utils import timezone

    from billing.budget_ledger import budget_line_at, budget_spent_from_ledger
    from tenants.models import Budget

    now = timezone.now()
    budgets = Budget.objects.select_related("org", "key").filter(
        Q(org_id=org_id), Q(scope="org") | Q(scope="key", key_id__in=key_ids)
    )
    rows = []
    for budget in budgets.order_by("pk"):
        line = budget_line_at(budget, now)
        ledger = budget_spent_from_ledger(budget, line.window.start_at, line.window.end_at)
        rows.append((budget, line, ledger))
    return rows


async def _budget_checks(
    rows: list[tuple[Any, Any, int]], by_key: dict[int, int], org_total: int, redis_url: str
) -> list[BudgetCheck]:
    from redis.asyncio import Redis

    from billing.budget_counters import RedisBudgetCounters

    client = Redis.from_url(redis_url)
    try:
        counters = RedisBudgetCounters(client)
        # Busy keys' leases (billing/budget_leases.py) are given back about a second
        # after the load stops: wait that long for nothing to stay reserved.
        lines = [line for _, line, _ in rows]
        for _ in range(50):
            spends = await counters.spent(lines)
            if all(spend.reserved_nanos == 0 for spend in spends):
                break
            await asyncio.sleep(0.1)
        checks = []
        for (budget, _, ledger), spend in zip(rows, spends, strict=True):
            if budget.scope == "org":
                label, events_cost = "org", org_total
            else:
                label, events_cost = f"key {budget.key.prefix}", by_key.get(budget.key_id, 0)
            checks.append(
                BudgetCheck(
                    budget=label,
                    counter_settled_nanos=spend.settled_nanos,
                    counter_reserved_nanos=spend.reserved_nanos,
                    ledger_nanos=ledger,
                    events_cost_nanos=events_cost,
                )
            )
        return checks
    finally:
        await client.aclose()
