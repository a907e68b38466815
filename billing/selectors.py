"""Reads for billing: prices for the proxy snapshot, usage for screens and reports."""

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any

import orjson
from django.db.models import (
    Count,
    F,
    Q,
    QuerySet,
    Sum,
    TextField,
)
from django.db.models.functions import Cast, TruncDay

from billing.contracts import PriceRates
from billing.models import (
    ModelPrice,
    RollupMeasures,
    RollupState,
    Statement,
    UsageEvent,
    UsageRollup,
    UsageTagRollup,
    UsageTeamRollup,
)
from billing.rollups import (
    COUNTERS,
    DAY,
    LATE_COMMIT_MARGIN,
    Measures,
    MeasuresTotal,
    day_floor,
    distinct_tags,
    histogram_percentile,
    hour_floor,
)
from tenants.models import Team, VirtualKey


def price_rates_all() -> list[PriceRates]:
    """Every price row (list and overrides), for the proxy's snapshot."""
    return [
        PriceRates(
            price_id=row.pk,
            org_id=row.org_id,
            provider_kind=row.provider_kind,
            model=row.model,
            input_usd_per_mtok=row.input_usd_per_mtok,
            output_usd_per_mtok=row.output_usd_per_mtok,
            cached_input_usd_per_mtok=row.cached_input_usd_per_mtok,
            reasoning_usd_per_mtok=row.reasoning_usd_per_mtok,
            effective_from=row.effective_from,
            effective_until=row.effective_until,
        )
        for row in ModelPrice.objects.all()
    ]


@dataclass(frozen=True, slots=True)
class UsageTotals:
    requests: int
    errors: int
    input_tokens: int
    output_tokens: int
    cost_nanos: int


def usage_totals(*, org_id: int, since: datetime, until: datetime) -> UsageTotals:
    """Request, error, token and cost totals for `org_id` in [since, until)."""
    totals = UsageEvent.objects.filter(
        org_id=org_id, started_at__gte=since, started_at__lt=until
    ).aggregate(
        requests=Count("id"),
        errors=Count("id", filter=~Q(outcome=UsageEvent.Outcome.SUCCESS)),
        input_tokens=Sum("input_tokens"),
        output_tokens=Sum("output_tokens"),
        cost_nanos=Sum("cost_nanos"),
    )
    return UsageTotals(**{name: value or 0 for name, value in totals.items()})


@dataclass(frozen=True, slots=True)
class ModelSpend:
    model: str
    requests: int
    cost_nanos: int


def spend_by_model(*, org_id: int, since: datetime, until: datetime) -> list[ModelSpend]:
    """Requests and cost per public model name in [since, until), costliest first."""
    rows = (
        UsageEvent.objects.filter(org_id=org_id, started_at__gte=since, started_at__lt=until)
        .values("model")
        .annotate(requests=Count("id"), cost_nanos=Sum("cost_nanos"))
        .order_by("-cost_nanos", "model")
    )
    return [
        ModelSpend(model=row["model"], requests=row["requests"], cost_nanos=row["cost_nanos"] or 0)
        for row in rows
    ]


# ---------------------------------------------------------------- rollups
# Reports read the rollups (billing/rollups.py), never the raw events, except by
# end user: that attribute is unbounded (one value per customer of a customer),
# so rolling it up would copy most of the ledger and keep it forever. End-user
# reports read the events, which is exact within TOLLGATE_USAGE_RETENTION_DAYS.

Granularity = RollupMeasures.Granularity
# Breakdown name -> rollup column.
BREAKDOWNS = {
    "team": "team_id",
    "key": "key_id",
    "model": "model",
    "provider": "provider_kind",
    "deployment": "deployment_id",
    "endpoint": "endpoint",
    "tag": "tag",
}
_PERCENTILES = (50, 95, 99)


def rollups_complete_until() -> datetime | None:
    """The hour before which the rollups hold every ingested event (None: never built)."""
    watermark = RollupState.objects.filter(pk=1).values_list("ingested_through", flat=True).first()
    if watermark is None:
        return None
    # An event committed slowly around the last run may be missing from its hour.
    return hour_floor(watermark - LATE_COMMIT_MARGIN)


def covering_rows(
    model: type[RollupMeasures], *, org_id: int, since: datetime, until: datetime
) -> QuerySet[Any]:
    """The org's rollup rows covering [since, until) (hour-aligned): day rows for
    whole UTC days inside it, hour rows for the partial days at its edges."""
    since, until = hour_floor(since), hour_floor(until)
    rows = model._default_manager.filter(org_id=org_id)
    first_day, end_day = day_floor(since), day_floor(until)
    if first_day != since:
        first_day += DAY
    if first_day >= end_day:
        return rows.filter(
            granularity=Granularity.HOUR, bucket_start__gte=since, bucket_start__lt=until
        )
    return rows.filter(
        Q(granularity=Granularity.DAY, bucket_start__gte=first_day, bucket_start__lt=end_day)
        | Q(granularity=Granularity.HOUR, bucket_start__gte=since, bucket_start__lt=first_day)
        | Q(granularity=Granularity.HOUR, bucket_start__gte=end_day, bucket_start__lt=until)
    )


_JSON_MEASURES = ("errors_by_class", "latency_histogram", "ttft_histogram")


def measure_rows(rows: QuerySet[Any], *columns: str) -> Iterator[dict[str, Any]]:
    """`rows.values(*columns, <measures>)`, with the JSON measures read as text and parsed
    by orjson: Django's own JSON decoding was most of a month-long report's time."""
    as_text = {f"_{name}": Cast(name, output_field=TextField()) for name in _JSON_MEASURES}
    for row in rows.values(*columns, *COUNTERS, **as_text):
        for name in _JSON_MEASURES:
            raw = row.pop(f"_{name}")
            row[name] = orjson.loads(raw) if raw else None
        yield row


def _json_by_group(
    rows: QuerySet[Any], column: str | None, *json_columns: str
) -> Iterator[tuple[object, list[Any]]]:
    """(group, parsed JSON columns) per row; the group is `column`'s value, or None."""
    as_text = [Cast(name, output_field=TextField()) for name in json_columns]
    for row in rows.values_list(*([column] if column else []), *as_text):
        key, raw = (row[0], row[1:]) if column else (None, row)
        yield key, [orjson.loads(value) if value else None for value in raw]


def _grouped_measures(
    rows: QuerySet[Any], column: str | None, *, ttft: bool = True
) -> dict[object, Measures]:
    """The rows' measures added up per value of `column` (None: one group, keyed None);
    without `ttft`, the time-to-first-token histograms are left empty.

    Counters are summed by the database. Error classes and histograms are JSON, which
    SQL cannot add portably, so only they are read row by row (error classes only
    from rows with failures) and added here: a month of a few hundred keys is tens of
    thousands of rows, and this reads a fraction of their bytes.
    """
    rows = rows.order_by()
    sums = {name: Sum(name) for name in COUNTERS}
    counted = rows.values(column).annotate(**sums) if column else [rows.aggregate(**sums)]
    totals = {
        row[column] if column else None: MeasuresTotal(
            counters={name: int(row[name] or 0) for name in COUNTERS}
        )
        for row in counted
    }
    failed = rows.filter(successes__lt=F("requests"))
    for key, (errors,) in _json_by_group(failed, column, "errors_by_class"):
        # A group missing here was rebuilt between the two reads: left for the next one.
        if (total := totals.get(key)) is not None:
            for error_class, count in (errors or {}).items():
                total.errors_by_class[error_class] = (
                    total.errors_by_class.get(error_class, 0) + count
                )
    histograms = ("latency_histogram", "ttft_histogram") if ttft else ("latency_histogram",)
    for key, (latency, *first_token) in _json_by_group(rows, column, *histograms):
        if (total := totals.get(key)) is not None:
            if latency:
                total.latency.append(latency)
            if first_token and first_token[0]:
                total.ttft.append(first_token[0])
    return {key: total.measures() for key, total in totals.items()}


@dataclass(frozen=True, slots=True)
class UsageSummary:
    """Usage of one group (or one time bucket): sums, errors by class, percentiles."""

    key: object  # the group's id or value (a bucket's start in a series); None for "none"
    label: str
    requests: int
    errors: int
    errors_by_class: dict[str, int]
    input_tokens: int
    cached_input_tokens: int
    output_tokens: int
    reasoning_tokens: int
    cost_nanos: int
    unpriced_requests: int
    cache_hits: int
    latency_mean_ms: float | None
    latency_p50_ms: float | None
    latency_p95_ms: float | None
    latency_p99_ms: float | None
    ttft_p50_ms: float | None
    ttft_p95_ms: float | None
    ttft_p99_ms: float | None

    @classmethod
    def of(cls, key: object, label: str, measures: Measures) -> "UsageSummary":
        counters = measures.counters
        latency = [histogram_percentile(measures.latency_histogram, p) for p in _PERCENTILES]
        ttft = [histogram_percentile(measures.ttft_histogram, p) for p in _PERCENTILES]
        return cls(
            key=key, label=label, requests=counters["requests"],
            errors=counters["requests"] - counters["successes"],
            errors_by_class=dict(sorted(measures.errors_by_class.items())),
            input_tokens=counters["input_tokens"],
            cached_input_tokens=counters["cached_input_tokens"],
            output_tokens=counters["output_tokens"],
            reasoning_tokens=counters["reasoning_tokens"], cost_nanos=counters["cost_nanos"],
            unpriced_requests=counters["unpriced_requests"], cache_hits=counters["cache_hits"],
            latency_mean_ms=(
                counters["latency_sum_ms"] / counters["latency_count"]
                if counters["latency_count"] else None
            ),
            latency_p50_ms=latency[0], latency_p95_ms=latency[1], latency_p99_ms=latency[2],
            ttft_p50_ms=ttft[0], ttft_p95_ms=ttft[1], ttft_p99_ms=ttft[2],
        )  # fmt: skip


def group_labels(by: str, keys: set[object], rows: dict[object, str]) -> dict[object, str]:
    """Display names: team and key names from tenants, deployment names from the rows."""
    if by == "team":
        names = dict(Team.objects.filter(pk__in=keys).values_list("pk", "name"))
        return {key: names.get(key, f"team #{key}") for key in keys if key is not None}
    if by == "key":
        found = VirtualKey.objects.filter(pk__in=keys).values_list("pk", "name", "prefix")
        names = {pk: f"{name} ({prefix})" for pk, name, prefix in found}
        return {key: names.get(key, f"key #{key}") for key in keys if key is not None}
    if by == "deployment":
        return rows
    return {key: str(key) for key in keys if key not in (None, "")}


def usage_breakdown(
    *, org_id: int, since: datetime, until: datetime, by: str | None = None
) -> list[UsageSummary]:
    """Usage in [since, until) (rounded down to hours) per `by` (see BREAKDOWNS), costliest
    first; with `by=None`, one summary of everything.

    By tag, a request with two tags counts under both: those groups overlap and
    must not be added up.
    """
    return usage_report(org_id=org_id, since=since, until=until, by=by)[0]


def _rollup_table(by: str | None) -> type[RollupMeasures]:
    """The smallest rollup table that has the `by` column."""
    if by is None or by == "team":
        return UsageTeamRollup
    return UsageTagRollup if by == "tag" else UsageRollup


def usage_report(
    *, org_id: int, since: datetime, until: datetime, by: str | None = None, ttft: bool = True
) -> tuple[list[UsageSummary], UsageSummary]:
    """`usage_breakdown` and the summary of all requests. By tag, the total is read
    apart: tag groups overlap and leave untagged requests out. Without `ttft`, the
    time-to-first-token percentiles are None (a month by key reads half the bytes)."""
    if by is not None and by not in BREAKDOWNS:
        raise ValueError(f"Unknown breakdown {by!r}; use one of {', '.join(BREAKDOWNS)}.")
    column = BREAKDOWNS[by] if by else None
    rows = covering_rows(_rollup_table(by), org_id=org_id, since=since, until=until)
    groups = _grouped_measures(rows, column, ttft=ttft)
    if by is None:
        total = UsageSummary.of(None, "all", groups.get(None) or Measures())
        return [total], total
    if by == "tag":
        total = usage_report(org_id=org_id, since=since, until=until, ttft=ttft)[1]
    else:
        everything = MeasuresTotal()
        for measures in groups.values():
            everything.add(measures)
        total = UsageSummary.of(None, "all", everything.measures())
    deployment_names: dict[object, str] = {}
    if by == "deployment":
        named = rows.exclude(deployment_name="").order_by("bucket_start")
        deployment_names = dict(named.values_list("deployment_id", "deployment_name"))
    labels = group_labels(by, set(groups), deployment_names)
    summaries = [
        UsageSummary.of(key, labels.get(key, "(none)"), measures)
        for key, measures in groups.items()
    ]
    return sorted(summaries, key=lambda s: (-s.cost_nanos, -s.requests, s.label)), total


def usage_series(
    *, org_id: int, since: datetime, until: datetime, granularity: str = Granularity.HOUR,
    model: str | None = None,
) -> list[UsageSummary]:  # fmt: skip
    """Usage per hour or UTC day in [since, until), oldest first; buckets without
    requests are left out. `model` narrows it to one public model name."""
    floor = day_floor if granularity == Granularity.DAY else hour_floor
    table: type[RollupMeasures] = UsageTeamRollup if model is None else UsageRollup
    rows = table._default_manager.filter(
        org_id=org_id, granularity=granularity,
        bucket_start__gte=floor(since), bucket_start__lt=until,
    )  # fmt: skip
    if model is not None:
        rows = rows.filter(model=model)
    buckets: dict[Any, Measures] = _grouped_measures(rows, "bucket_start")
    return [UsageSummary.of(start, start.isoformat(), buckets[start]) for start in sorted(buckets)]


@dataclass(frozen=True, slots=True)
class DaySpend:
    day: datetime  # UTC midnight
    requests: int
    cost_nanos: int


def spend_per_day(*, org_id: int, since: datetime, until: datetime) -> list[DaySpend]:
    """Requests and cost per UTC day in [since, until) (whole hours), oldest first, summed
    by the database: one query, whatever the number of keys."""
    rows = (
        covering_rows(UsageTeamRollup, org_id=org_id, since=since, until=until)
        .annotate(day=TruncDay("bucket_start", tzinfo=UTC))
        .order_by()
        .values("day")
        .annotate(day_requests=Sum("requests"), day_cost=Sum("cost_nanos"))
        .order_by("day")
    )
    return [
        DaySpend(row["day"], int(row["day_requests"] or 0), int(row["day_cost"] or 0))
        for row in rows
    ]


@dataclass(frozen=True, slots=True)
class EndUserUsage:
    end_user: str
    requests: int
    errors: int
    input_tokens: int
    output_tokens: int
    cost_nanos: int


def usage_by_end_user(
    *, org_id: int, since: datetime, until: datetime, limit: int = 100
) -> list[EndUserUsage]:
    """Usage per end user in [since, until), costliest first, from the raw events
    (so only within the retention period); requests without an end user are left out."""
    rows = (
        UsageEvent.objects.filter(org_id=org_id, started_at__gte=since, started_at__lt=until)
        .exclude(end_user="")
        .values("end_user")
        .annotate(
            requests=Count("id"),
            errors=Count("id", filter=~Q(outcome=UsageEvent.Outcome.SUCCESS)),
            input_tokens=Sum("input_tokens"),
            output_tokens=Sum("output_tokens"),
            cost_nanos=Sum("cost_nanos"),
        )
        .order_by("-cost_nanos", "-requests", "end_user")[:limit]
    )
    return [
        EndUserUsage(
            end_user=row["end_user"],
            requests=row["requests"],
            errors=row["errors"],
            input_tokens=int(row["input_tokens"] or 0),
            output_tokens=int(row["output_tokens"] or 0),
            cost_nanos=int(row["cost_nanos"] or 0),
        )  # fmt: skip
        for row in rows
    ]


# ---------------------------------------------------------------- finance reads
# Statements are closed and previewed by billing/statements.py; these are the
# reads a statement list and a "requests behind this figure" export need.


@dataclass(frozen=True, slots=True)
class StatementSummary:
    statement_id: int
    month: date
    time_zone: str
    closed_at: datetime
    total_nanos: int


def statements_list(*, org_id: int) -> list[StatementSummary]:
    """The org's closed statements, newest month first."""
    rows = Statement.objects.filter(org_id=org_id).order_by("-month")
    return [
        StatementSummary(
            statement_id=row.pk,
            month=row.month,
            time_zone=row.time_zone,
            closed_at=row.closed_at,
            total_nanos=row.total_nanos,
        )
        for row in rows
    ]


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    """One raw event, as an export of the requests behind a figure lists it."""

    event_id: uuid.UUID
    started_at: datetime
    team_id: int | None
    team_name: str
    key_prefix: str
    key_name: str
    endpoint: str
    model: str
    provider_kind: str
    deployment_name: str
    upstream_model: str
    outcome: str
    status_code: int
    input_tokens: int
    cached_input_tokens: int
    output_tokens: int
    reasoning_tokens: int
    priced: bool
    cost_nanos: int
    tags: tuple[str, ...]
    end_user: str


NO_TEAM = "none"
LEDGER_PAGE_SIZE = 2000
_LEDGER_COLUMNS = (
    "id", "started_at", "team_id", "team__name", "key__prefix", "key__name", "endpoint",
    "model", "provider_kind", "deployment_name", "upstream_model", "outcome", "status_code",
    "input_tokens", "cached_input_tokens", "output_tokens", "reasoning_tokens", "priced",
    "cost_nanos", "tags", "end_user",
)  # fmt: skip


def ledger_page(
    *, org_id: int, since: datetime | None = None, until: datetime | None = None,
    statement_id: int | None = None, unbilled: bool = False, team: int | str | None = None,
    after: tuple[datetime, uuid.UUID] | None = None, limit: int = LEDGER_PAGE_SIZE,
) -> list[LedgerEntry]:  # fmt: skip
    """Up to `limit` of the org's events in [since, until) (either bound optional), oldest
    first; pass the last entry's (started_at, event_id) as `after` for the next page.

    Narrowed to one statement's events (`statement_id`), or to events on no statement yet
    (`unbilled`), and to one team (`team`: a team id, or NO_TEAM for events without one).
    """
    events = UsageEvent.objects.filter(org_id=org_id)
    if since is not None:
        events = events.filter(started_at__gte=since)
    if until is not None:
        events = events.filter(started_at__lt=until)
    if statement_id is not None:
        events = events.filter(statement_id=statement_id)
    if unbilled:
        events = events.filter(statement__isnull=True)
    if team == NO_TEAM:
        events = events.filter(team__isnull=True)
    elif team is not None:
        events = events.filter(team_id=team)
    if after is not None:
        # Keyset paging: stable under concurrent inserts, cheap on the (org, started_at) index.
        started_at, event_id = after
        events = events.filter(
            Q(started_at__gt=started_at) | Q(started_at=started_at, id__gt=event_id)
        )
    rows = events.order_by("started_at", "id").values_list(*_LEDGER_COLUMNS)[:limit]
    return [
        LedgerEntry(
            event_id=event_id, started_at=started_at, team_id=team_id,
            team_name=team_name or "", key_prefix=key_prefix or "", key_name=key_name or "",
            endpoint=endpoint, model=model, provider_kind=provider_kind,
            deployment_name=deployment_name, upstream_model=upstream_model, outcome=outcome,
            status_code=status_code, input_tokens=input_tokens,
            cached_input_tokens=cached_input_tokens, output_tokens=output_tokens,
            reasoning_tokens=reasoning_tokens, priced=priced, cost_nanos=cost_nanos,
            tags=tuple(distinct_tags(tags)), end_user=end_user,
        )
        for (event_id, started_at, team_id, team_name, key_prefix, key_name, endpoint, model,
             provider_kind, deployment_name, upstream_model, outcome, status_code, input_tokens,
             cached_input_tokens, output_tokens, reasoning_tokens, priced, cost_nanos, tags,
             end_user) in rows
    ]  # fmt: skip
