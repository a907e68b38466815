"""Finance can trust every number: thousands of concurrent requests through the real
production stack (`bin/run-stack`: two uvicorn workers, Celery worker and beat, PostgreSQL,
Redis) end up, one event per request, in rollups and monthly statements that agree with
the raw events to the nano-dollar; cents appear only on statements, with the rounding shown.
"""

import asyncio
import random
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import openai
import pytest
import redis
from django.conf import settings
from django.db.models import Count, Sum
from django.utils import timezone
from openai import AsyncOpenAI

from billing.contracts import TokenUsage, UsageRecord
from billing.ingest import usage_events_write
from billing.models import (
    ModelPrice,
    RollupState,
    Statement,
    UsageEvent,
    UsageRollup,
    UsageTagRollup,
)
from billing.rollup_tasks import rollups_refresh_task
from billing.statements import (
    NANOS_PER_CENT,
    StatementView,
    month_bounds,
    statement_close,
    statement_preview,
    statement_view,
)
from billing.stream import ENTRY_FIELD, USAGE_GROUP, dead_letter_stream, usage_record_encode
from routing.models import Provider, Route
from tenants.models import Organization, Team
from tests.conftest import IssueKey, MakeRoute
from tests.support.gateway import wait_until
from tests.support.stack import production_stack

pytestmark = [
    pytest.mark.skipif(
        not settings.REDIS_URL or "postgresql" not in settings.DATABASES["default"]["ENGINE"],
        reason="the production-like stack runs on PostgreSQL and Redis (DATABASE_URL and "
        "REDIS_URL unset)",
    ),
    # The stack's processes see only committed rows; the flush afterwards removes theirs.
    pytest.mark.django_db(transaction=True),
]

REQUESTS = 3_000
CONCURRENCY = 64
TAG = "ledger-e2e"
Outcome = UsageEvent.Outcome
Granularity = UsageRollup.Granularity

# Public model -> (upstream model with mock directives, list price in USD per Mtok).
# Rates with 4 decimals make half-nano costs, so the one rounding per event shows.
ROUTES = {
    "cheap-chat": ("cheap+tokens=40", ("0.15", "0.60")),
    "big-chat": ("big+tokens=64", ("3.0", "15.0")),
    "frac-chat": ("frac+tokens=24", ("0.0375", "1.2345")),  # org A's own route
    "broken-chat": ("broken+fault=500", ("3.0", "15.0")),  # no backup: an error event
}
# Org B's negotiated rate for cheap-chat, which wins over the list price.
B_CHEAP_OVERRIDE = ("0.1275", "0.5125")


@dataclass(frozen=True, slots=True)
class Call:
    org: str  # "a" or "b"
    key: str
    kind: str  # "chat", "stream" or "models"
    model: str
    prompt_words: int
    max_tokens: int
    tags: tuple[str, ...]
    include_usage: bool
    statuses: frozenset[int]  # what the client may get back


@dataclass(frozen=True, slots=True)
class Sent:
    call: Call
    status: int
    request_id: str | None
    usage: tuple[int, int] | None  # prompt and completion tokens, as the client was told


@dataclass(frozen=True, slots=True)
class Tenant:
    org: Organization
    teams: list[Team]
    keys: list[str]
    models: list[str]


def half_up_cents(nanos: int) -> int:
    return (nanos + NANOS_PER_CENT // 2) // NANOS_PER_CENT


def expected_cost_nanos(rates: tuple[str, str], input_tokens: int, output_tokens: int) -> int:
    """Rates in USD per Mtok are nanos per token divided by 1,000; one rounding, half up."""
    nanos = (input_tokens * Decimal(rates[0]) + output_tokens * Decimal(rates[1])) * 1000
    return int(nanos.quantize(Decimal(1), rounding=ROUND_HALF_UP))


def local_month(moment: datetime, time_zone: str) -> date:
    return moment.astimezone(ZoneInfo(time_zone)).date().replace(day=1)


def previous_month(month: date) -> date:
    return (month - timedelta(days=1)).replace(day=1)


@pytest.fixture
def stream() -> Iterator[str]:
    """A usage stream of this test's own: no other worker in the session drains it."""
    name = f"tollgate:usage:ledger-e2e-{uuid.uuid4().hex}"
    yield name
    client = redis.Redis.from_url(settings.REDIS_URL)
    client.delete(name, dead_letter_stream(name))
    client.close()


def build_tenants(make_route: MakeRoute, issue_key: IssueKey) -> tuple[Tenant, Tenant]:
    a = Organization.objects.create(slug="ledger-a", name="Ledger A", time_zone="America/New_York")
    b = Organization.objects.create(slug="ledger-b", name="Ledger B", time_zone="Asia/Kolkata")
    for model, (upstream, price) in ROUTES.items():
        route = make_route(
            model=model, org=a if model == "frac-chat" else None, upstream_model=upstream,
            price=price,
        )  # fmt: skip
        if model == "broken-chat":
            Route.objects.filter(pk=route.pk).update(max_attempts=1)
    ModelPrice.objects.create(
        org=b,
        provider_kind=Provider.Kind.MOCK,
        model=ROUTES["cheap-chat"][0],
        input_usd_per_mtok=Decimal(B_CHEAP_OVERRIDE[0]),
        output_usd_per_mtok=Decimal(B_CHEAP_OVERRIDE[1]),
        effective_from=datetime(2021, 1, 1, tzinfo=ZoneInfo("UTC")),
        source=ModelPrice.Source.OVERRIDE,
    )
    tenants = []
    for org, team_names, models in (
        (a, ["Platform", "Research"], ["cheap-chat", "big-chat", "frac-chat"]),
        (b, ["Apps", "Data", "Search"], ["cheap-chat", "big-chat"]),
    ):
        teams = [Team.objects.create(org=org, slug=n.lower(), name=n) for n in team_names]
        keys = [issue_key(org, name=f"{t.slug}-{n}", team=t) for t in teams for n in (1, 2)]
        keys.append(issue_key(org, name="no team"))
        tenants.append(Tenant(org=org, teams=teams, keys=keys, models=models))
    return tenants[0], tenants[1]


def plan_calls(tenants: dict[str, Tenant], rng: random.Random) -> list[Call]:
    """REQUESTS calls, half per org: mostly priced chats, streamed or not, some tagged,
    a few that fail upstream (502, or 503 once the circuit opens) or name no model (404)."""
    calls = []
    for n in range(REQUESTS):
        name = "ab"[n % 2]
        tenant = tenants[name]
        roll = rng.random()
        kind, model, statuses = "chat", rng.choice(tenant.models), frozenset({200})
        if roll < 0.40:
            kind = "stream"
        elif roll < 0.43:
            kind, model = rng.choice(["chat", "stream"]), "broken-chat"
            statuses = frozenset({502, 503})
        elif roll < 0.44:
            model, statuses = "no-such-model", frozenset({404})
        elif roll < 0.45:
            kind, model = "models", ""
        tags: tuple[str, ...] = ()
        if rng.random() < 0.15:
            tags = (TAG, f"batch:{rng.randint(1, 3)}")
        calls.append(
            Call(
                org=name, key=rng.choice(tenant.keys), kind=kind, model=model,
                prompt_words=rng.randint(1, 300), max_tokens=rng.randint(1, 64), tags=tags,
                include_usage=rng.random() < 0.5, statuses=statuses,
            )
        )  # fmt: skip
    return calls


async def send(client: AsyncOpenAI, call: Call) -> Sent:
    """One call through the official SDK; what the client saw, errors included."""
    headers = {"x-tollgate-tags": ",".join(call.tags)} if call.tags else {}
    messages: Any = [{"role": "user", "content": " ".join(["ledger"] * call.prompt_words)}]
    usage = None
    try:
        if call.kind == "models":
            raw: Any = await client.models.with_raw_response.list(extra_headers=headers)
            raw.parse()
        elif call.kind == "chat":
            raw = await client.chat.completions.with_raw_response.create(
                model=call.model, messages=messages, max_tokens=call.max_tokens,
                extra_headers=headers,
            )  # fmt: skip
            reply = raw.parse()
            usage = (reply.usage.prompt_tokens, reply.usage.completion_tokens)
        else:
            options: Any = {"stream_options": {"include_usage": True}} if call.include_usage else {}
            raw = await client.chat.completions.with_raw_response.create(
                model=call.model, messages=messages, max_tokens=call.max_tokens, stream=True,
                extra_headers=headers, **options,
            )  # fmt: skip
            async for chunk in raw.parse():
                if chunk.usage is not None:
                    usage = (chunk.usage.prompt_tokens, chunk.usage.completion_tokens)
    except openai.APIStatusError as exc:
        return Sent(call, exc.status_code, exc.response.headers.get("x-request-id"), None)
    return Sent(call, raw.status_code, raw.headers.get("x-request-id"), usage)


async def fire(base_url: str, calls: list[Call]) -> list[Sent]:
    """Send every call, at most CONCURRENCY at a time, over one connection pool."""
    gate = asyncio.Semaphore(CONCURRENCY)
    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
    async with openai.DefaultAsyncHttpxClient(limits=limits, timeout=60) as http:
        clients = {
            key: AsyncOpenAI(base_url=base_url, api_key=key, max_retries=0, http_client=http)
            for key in {call.key for call in calls}
        }

        async def one(call: Call) -> Sent:
            async with gate:
                return await send(clients[call.key], call)

        return list(await asyncio.gather(*(one(call) for call in calls)))


def history_record(tenant: Tenant, started_at: datetime, model: str, tokens: tuple[int, int],
                   *, team: int = 0) -> UsageRecord:  # fmt: skip
    """An event written straight to the ledger (or the stream), priced at list price."""
    upstream, rates = ROUTES[model]
    return UsageRecord(
        event_id=uuid.uuid4(), org_id=tenant.org.pk, team_id=tenant.teams[team].pk, key_id=None,
        endpoint="chat.completions", model=model, provider_kind=Provider.Kind.MOCK,
        upstream_model=upstream, outcome=Outcome.SUCCESS, status_code=200,
        started_at=started_at, finished_at=started_at + timedelta(seconds=2),
        usage=TokenUsage(input_tokens=tokens[0], output_tokens=tokens[1]),
        cost_nanos=expected_cost_nanos(rates, *tokens), tags=(TAG,),
    )  # fmt: skip


def event_totals(org: Organization, **filters: Any) -> dict[str, int]:
    totals = UsageEvent.objects.filter(org=org, **filters).aggregate(
        requests=Count("id"),
        input_tokens=Sum("input_tokens"),
        output_tokens=Sum("output_tokens"),
        cost_nanos=Sum("cost_nanos"),
    )
    return {name: int(value or 0) for name, value in totals.items()}


def rollup_totals(model: type[UsageRollup] | type[UsageTagRollup], org: Organization,
                  granularity: str, **filters: Any) -> dict[str, int]:  # fmt: skip
    # Every row of the org, whatever hour or day: the sums hold across any boundary.
    totals = model.objects.filter(org=org, granularity=granularity, **filters).aggregate(
        requests=Sum("requests"),
        input_tokens=Sum("input_tokens"),
        output_tokens=Sum("output_tokens"),
        cost_nanos=Sum("cost_nanos"),
    )
    return {name: int(value or 0) for name, value in totals.items()}


def assert_cents_shown_exactly(view: StatementView) -> None:
    """Nanos add up exactly; cents are rounded half up once per line and once for the
    total, and the difference between the two is shown as the rounding."""
    assert view.total_nanos == sum(line.amount_nanos for line in view.lines)
    assert view.total_cents == half_up_cents(view.total_nanos)
    assert all(line.amount_cents == half_up_cents(line.amount_nanos) for line in view.lines)
    line_cents = sum(half_up_cents(line.amount_nanos) for line in view.lines)
    assert view.rounding_cents == view.total_cents - line_cents


@pytest.mark.slow
def test_every_request_through_the_production_stack_reconciles_to_the_nano(
    make_route: MakeRoute, issue_key: IssueKey, stream: str, tmp_path: Path
) -> None:
    a, b = build_tenants(make_route, issue_key)
    tenants = {"a": a, "b": b}
    tz_a = a.org.time_zone

    # Org A's previous month: a few events, closed before the traffic starts.
    closed_month = previous_month(local_month(timezone.now(), tz_a))
    month_start = month_bounds(closed_month, tz_a)[0]
    history = [
        history_record(a, month_start + timedelta(days=day, hours=hour), model, tokens, team=n % 2)
        for n, (day, hour, model, tokens) in enumerate(
            [
                (0, 9, "cheap-chat", (123_457, 98_765)),
                (6, 13, "big-chat", (812_345, 123_457)),
                (13, 17, "frac-chat", (1_001, 333)),
                (20, 22, "big-chat", (54_321, 7_777)),
                (27, 3, "cheap-chat", (99_999, 11_111)),
            ]
        )
    ]  # fmt: skip
    usage_events_write(history)
    closed = statement_close(org=a.org, month=closed_month, grace=timedelta(0))
    closed_view = statement_view(org=a.org, month=closed_month)
    closed_events = set(UsageEvent.objects.filter(statement=closed).values_list("id", flat=True))
    assert closed_events == {record.event_id for record in history}
    assert closed_view.total_nanos == sum(record.cost_nanos for record in history)

    calls = plan_calls(tenants, random.Random(20_261_121))
    redis_client = redis.Redis.from_url(settings.REDIS_URL)
    with production_stack(
        tmp_path, WEB_WORKERS="2", TOLLGATE_USAGE_STREAM=stream, TOLLGATE_USAGE_DRAIN_SECONDS="1"
    ) as server:
        started = time.monotonic()
        sent = asyncio.run(fire(server.v1, calls))
        traffic_s = time.monotonic() - started

        # An event of A's closed month arrives late, through the stream like any other.
        late = history_record(
            a, month_start + timedelta(days=15, hours=12), "big-chat", (812_345, 123_457), team=1
        )
        redis_client.xadd(stream, {ENTRY_FIELD: usage_record_encode(late)})

        # Every call reached the gateway with a key it accepted and got what it should.
        unexpected = Counter(
            (s.call.model, s.status) for s in sent if s.status not in s.call.statuses
        )
        assert not unexpected, unexpected
        assert all(s.request_id for s in sent)
        request_ids = [uuid.UUID(s.request_id) for s in sent if s.request_id]
        assert len(set(request_ids)) == REQUESTS  # unique
        sent_by_org = Counter(s.call.org for s in sent)
        expected_counts = {"a": sent_by_org["a"] + len(history) + 1, "b": sent_by_org["b"]}

        def ingested() -> bool:
            return all(
                UsageEvent.objects.filter(org=tenants[name].org).count() >= count
                for name, count in expected_counts.items()
            )

        wait_until(ingested, timeout_s=60, what="every request's usage event in the ledger")
        drain_s = time.monotonic() - started - traffic_s
        # Settled: the stream is empty, nothing is held, and nothing more arrives.
        wait_until(
            lambda: (
                redis_client.xlen(stream) == 0
                and redis_client.xpending(stream, USAGE_GROUP)["pending"] == 0
            ),
            what="the usage stream to drain",
        )
        time.sleep(1.0)  # several producer flushes and drain reads: a duplicate would show
        assert redis_client.xlen(dead_letter_stream(stream)) == 0

        # Rollups, rebuilt by the real worker: any run that began after this covers every event.
        rollup_started, dispatched_at = time.monotonic(), timezone.now()
        rollups_refresh_task.delay()
        wait_until(
            lambda: RollupState.objects.filter(ingested_through__gte=dispatched_at).exists(),
            timeout_s=30,
            what="the rollup refresh to run on the worker",
        )
        rollup_s = time.monotonic() - rollup_started
    redis_client.close()

    # ---- One event per request, with exactly what the client was told and charged.
    sent_by_id = {uuid.UUID(s.request_id): s for s in sent if s.request_id}
    for name, tenant in tenants.items():
        events = {event.id: event for event in UsageEvent.objects.filter(org=tenant.org)}
        assert len(events) == expected_counts[name]
        traffic = {event_id for event_id, s in sent_by_id.items() if s.call.org == name}
        assert set(events) - closed_events - {late.event_id} == traffic
        for event_id in traffic:
            event, seen = events[event_id], sent_by_id[event_id]
            assert event.status_code == seen.status
            assert event.is_stream == (seen.call.kind == "stream")
            assert tuple(event.tags) == seen.call.tags
            if seen.usage is not None:
                assert (event.input_tokens, event.output_tokens) == seen.usage
            if event.outcome == Outcome.SUCCESS and seen.call.kind != "models":
                rates = ROUTES[event.model][1]
                if name == "b" and event.model == "cheap-chat":
                    rates = B_CHEAP_OVERRIDE
                expected = expected_cost_nanos(rates, event.input_tokens, event.output_tokens)
                assert event.cost_nanos == expected, event
            else:
                assert event.cost_nanos == 0, event

    for name, tenant in tenants.items():
        org = tenant.org
        ledger = event_totals(org)
        # ---- Rollups equal the ledger, hour rows and day rows alike, to the nano.
        assert rollup_totals(UsageRollup, org, Granularity.HOUR) == ledger
        assert rollup_totals(UsageRollup, org, Granularity.DAY) == ledger
        for granularity in Granularity.values:
            tagged = rollup_totals(UsageTagRollup, org, granularity, tag=TAG)
            assert tagged == event_totals(org, tags__contains=[TAG])

        # ---- The open month's statement: every unbilled event, lines in exact nanos.
        preview = statement_preview(org=org, month=local_month(timezone.now(), org.time_zone))
        assert_cents_shown_exactly(preview)
        unbilled = event_totals(org, statement__isnull=True)
        assert preview.total_nanos == unbilled["cost_nanos"]
        assert sum(line.requests for line in preview.lines) == unbilled["requests"]
        billed = closed_view.total_nanos if name == "a" else 0
        assert billed + preview.total_nanos == ledger["cost_nanos"]
        by_team: defaultdict[int | None, int] = defaultdict(int)
        for line in preview.lines:
            by_team[line.team_id] += line.amount_nanos
        events_by_team = (
            UsageEvent.objects.filter(org=org, statement__isnull=True)
            .values("team_id")
            .annotate(cost=Sum("cost_nanos"))
        )
        assert dict(by_team) == {row["team_id"]: row["cost"] for row in events_by_team}
        print(
            f"\norg {name}: {ledger['requests']} events, {ledger['cost_nanos']} nanos; "
            f"open statement ${preview.total_cents / 100:.2f} over {len(preview.lines)} lines "
            f"(lines sum to ${(preview.total_cents - preview.rounding_cents) / 100:.2f}, "
            f"rounding {preview.rounding_cents:+d}¢)"
        )

    # ---- A's closed month is untouched; its late event is an adjustment on the next one.
    assert statement_view(org=a.org, month=closed_month) == closed_view
    assert set(UsageEvent.objects.filter(statement=closed).values_list("id", flat=True)) == (
        closed_events
    )
    preview = statement_preview(org=a.org, month=local_month(timezone.now(), tz_a))
    adjustments = [line for line in preview.lines if line.usage_month == closed_month]
    assert [(line.kind, line.requests, line.amount_nanos) for line in adjustments] == [
        ("adjustment", 1, late.cost_nanos)
    ]

    # ---- Closing A's open month(s) freezes exactly the preview; every event billed once.
    open_months = sorted(
        {local_month(moment, tz_a) for moment in UsageEvent.objects.filter(
            org=a.org, statement__isnull=True).values_list("started_at", flat=True)}
        - {closed_month}
    )  # fmt: skip
    after_last = month_bounds(open_months[-1], tz_a)[1]
    for month in open_months:
        statement_close(org=a.org, month=month, now=after_last, grace=timedelta(0))
    assert not UsageEvent.objects.filter(org=a.org, statement__isnull=True).exists()
    statements = Statement.objects.filter(org=a.org)
    assert (
        sum(statements.values_list("total_nanos", flat=True)) == event_totals(a.org)["cost_nanos"]
    )
    if len(open_months) == 1:  # no month boundary crossed during the run
        frozen = statement_view(org=a.org, month=open_months[0])
        assert frozen.is_closed and frozen.lines == preview.lines
        assert_cents_shown_exactly(frozen)
    assert statement_view(org=a.org, month=closed_month) == closed_view

    print(
        f"{REQUESTS} requests in {traffic_s:.1f} s ({REQUESTS / traffic_s:.0f} req/s, "
        f"{CONCURRENCY} concurrent, 2 web workers); ingested {drain_s:.1f} s after the last "
        f"response; rollup refresh on the worker {rollup_s:.1f} s"
    )
