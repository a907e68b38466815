"""Reads for billing: prices for the proxy snapshot, usage for screens and reports."""

import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

import orjson
from django.db import connection
from django.db.models import (
    BooleanField,
    Case,
    Count,
    Exists,
    F,
    OuterRef,
    Q,
    QuerySet,
    Sum,
    TextField,
    Value,
    When,
)
from django.db.models.functions import Cast, TruncDay, TruncHour

from billing.contracts import PriceRates, UpstreamAttempt
from billing.models import (
    ModelPrice,
    RollupMeasures,
    RollupState,
    Statement,
    UsageEvent,
    UsageEventBody,
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
    _bucket_of,
    day_floor,
    distinct_tags,
    histogram_merge,
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


@dataclass(frozen=True, slots=True)
class RecentRequest:
    event_id: str
    started_at: datetime
    key_prefix: str
    model: str
    status_code: int
    outcome: str
    input_tokens: int
    output_tokens: int
    cost_nanos: int
    latency_ms: int | None
    is_stream: bool


_RECENT_COLUMNS = (
    "id", "started_at", "key__prefix", "model", "status_code", "outcome",
    "input_tokens", "output_tokens", "cost_nanos", "latency_ms", "is_stream",
)  # fmt: skip


def _recent_request(row: dict[str, Any]) -> RecentRequest:
    return RecentRequest(
        event_id=str(row["id"]),
        started_at=row["started_at"],
        key_prefix=row["key__prefix"] or "",
        model=row["model"],
        status_code=row["status_code"],
        outcome=row["outcome"],
        input_tokens=row["input_tokens"],
        output_tokens=row["output_tokens"],
        cost_nanos=row["cost_nanos"],
        latency_ms=row["latency_ms"],
        is_stream=row["is_stream"],
    )


def recent_requests(*, org_id: int, limit: int = 25) -> list[RecentRequest]:
    """The org's latest requests, newest first."""
    rows = (
        UsageEvent.objects.filter(org_id=org_id)
        .order_by("-started_at")
        .values(*_RECENT_COLUMNS)[:limit]
    )
    return [_recent_request(row) for row in rows]


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


def _covering_rows(
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


def _measure_rows(rows: QuerySet[Any], *columns: str) -> Iterator[dict[str, Any]]:
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


def _labels(by: str, keys: set[object], rows: dict[object, str]) -> dict[object, str]:
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
    rows = _covering_rows(_rollup_table(by), org_id=org_id, since=since, until=until)
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
    labels = _labels(by, set(groups), deployment_names)
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
    buckets = _grouped_measures(rows, "bucket_start")
    return [
        UsageSummary.of(start, start.isoformat(), buckets[start])  # type: ignore[arg-type]
        for start in sorted(buckets)  # type: ignore[type-var]
    ]


@dataclass(frozen=True, slots=True)
class DaySpend:
    day: datetime  # UTC midnight
    requests: int
    cost_nanos: int


def spend_per_day(*, org_id: int, since: datetime, until: datetime) -> list[DaySpend]:
    """Requests and cost per UTC day in [since, until) (whole hours), oldest first, summed
    by the database: one query, whatever the number of keys."""
    rows = (
        _covering_rows(UsageTeamRollup, org_id=org_id, since=since, until=until)
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


# ---------------------------------------------------------------- request log
# The request log reads raw events newest first, a page at a time, keyset-paged on
# (started_at, id) so a deep page costs what the first one does. Every filter is an
# equality or range the (org | team | key, started_at) indexes serve.

REQUEST_LOG_PAGE_SIZE = 50


@dataclass(frozen=True, slots=True)
class RequestLogFilter:
    """What the request log is narrowed to; empty values do not narrow."""

    key_id: int | None = None
    team_id: int | None = None
    model: str = ""
    outcome: str = ""
    status_code: int | None = None
    tag: str = ""
    end_user: str = ""
    since: datetime | None = None
    until: datetime | None = None


@dataclass(frozen=True, slots=True)
class RequestLogEntry:
    """One row of the request log."""

    event_id: uuid.UUID
    started_at: datetime
    key_prefix: str
    key_name: str
    endpoint: str
    model: str
    deployment_name: str
    outcome: str
    status_code: int
    input_tokens: int
    output_tokens: int
    cost_nanos: int
    latency_ms: int | None
    ttft_ms: int | None
    attempts: int
    tags: tuple[str, ...]
    cache_hit: bool
    is_stream: bool


_REQUEST_LOG_COLUMNS = (
    "id", "started_at", "key__prefix", "key__name", "endpoint", "model", "deployment_name",
    "outcome", "status_code", "input_tokens", "output_tokens", "cost_nanos", "latency_ms",
    "ttft_ms", "attempts", "tags", "cache_hit", "is_stream",
)  # fmt: skip


def _with_tag(events: QuerySet[UsageEvent], tag: str) -> QuerySet[UsageEvent]:
    """Events carrying `tag`. PostgreSQL: jsonb containment. SQLite has none, but
    tags are validated to characters JSON never escapes, so `"tag"` in the text is exact."""
    if connection.vendor == "postgresql":
        return events.filter(tags__contains=[tag])
    return events.annotate(tags_text=Cast("tags", TextField())).filter(
        tags_text__contains=f'"{tag}"'
    )


def _request_log_events(*, org_id: int, filters: RequestLogFilter) -> QuerySet[UsageEvent]:
    events = UsageEvent.objects.filter(org_id=org_id)
    if filters.key_id is not None:
        events = events.filter(key_id=filters.key_id)
    if filters.team_id is not None:
        events = events.filter(team_id=filters.team_id)
    if filters.model:
        events = events.filter(model=filters.model)
    if filters.outcome:
        events = events.filter(outcome=filters.outcome)
    if filters.status_code is not None:
        events = events.filter(status_code=filters.status_code)
    if filters.end_user:
        events = events.filter(end_user=filters.end_user)
    if filters.since is not None:
        events = events.filter(started_at__gte=filters.since)
    if filters.until is not None:
        events = events.filter(started_at__lt=filters.until)
    if filters.tag:
        events = _with_tag(events, filters.tag)
    return events


def request_log_page(
    *,
    org_id: int,
    filters: RequestLogFilter = RequestLogFilter(),
    before: tuple[datetime, uuid.UUID] | None = None,
    limit: int = REQUEST_LOG_PAGE_SIZE,
) -> list[RequestLogEntry]:
    """Up to `limit` of the org's requests matching `filters`, newest first; pass the
    last entry's (started_at, event_id) as `before` for the next (older) page."""
    events = _request_log_events(org_id=org_id, filters=filters)
    if before is not None:
        started_at, event_id = before
        # The plain bound lets the index range-scan; the OR only breaks ties.
        events = events.filter(started_at__lte=started_at).filter(
            Q(started_at__lt=started_at) | Q(id__lt=event_id)
        )
    rows = events.order_by("-started_at", "-id").values_list(*_REQUEST_LOG_COLUMNS)[:limit]
    return [
        RequestLogEntry(
            event_id=event_id, started_at=started_at, key_prefix=key_prefix or "",
            key_name=key_name or "", endpoint=endpoint, model=model,
            deployment_name=deployment_name, outcome=outcome, status_code=status_code,
            input_tokens=input_tokens, output_tokens=output_tokens, cost_nanos=cost_nanos,
            latency_ms=latency_ms, ttft_ms=ttft_ms, attempts=attempts,
            tags=tuple(distinct_tags(tags)), cache_hit=cache_hit, is_stream=is_stream,
        )
        for (event_id, started_at, key_prefix, key_name, endpoint, model, deployment_name,
             outcome, status_code, input_tokens, output_tokens, cost_nanos, latency_ms, ttft_ms,
             attempts, tags, cache_hit, is_stream) in rows
    ]  # fmt: skip


@dataclass(frozen=True, slots=True)
class KeyChoice:
    key_id: int
    prefix: str
    name: str
    revoked: bool


def request_log_keys(*, org_id: int, team_id: int | None = None) -> list[KeyChoice]:
    """The org's keys (one team's, with `team_id`), revoked ones too: their requests stay."""
    keys = VirtualKey.objects.filter(org_id=org_id)
    if team_id is not None:
        keys = keys.filter(team_id=team_id)
    rows = keys.order_by("name", "prefix").values_list("id", "prefix", "name", "revoked_at")
    return [
        KeyChoice(key_id=key_id, prefix=prefix, name=name, revoked=revoked_at is not None)
        for key_id, prefix, name, revoked_at in rows
    ]


def request_log_teams(*, org_id: int) -> list[tuple[int, str]]:
    """The org's teams as (id, name), by name, for the request log's team filter."""
    return list(Team.objects.filter(org_id=org_id).order_by("name").values_list("pk", "name"))


def request_log_models(*, org_id: int, since: datetime) -> list[str]:
    """Models the org's requests asked for since `since`, from the day rollups (cheap)."""
    return list(
        UsageRollup.objects.filter(
            org_id=org_id, granularity=Granularity.DAY, bucket_start__gte=day_floor(since)
        )
        .exclude(model="")
        .order_by("model")
        .values_list("model", flat=True)
        .distinct()
    )


@dataclass(frozen=True, slots=True)
class RequestDetail:
    """Everything the ledger knows about one request (bodies excepted: see request_bodies)."""

    event_id: uuid.UUID
    org_id: int
    team_id: int | None
    team_name: str
    key_id: int | None
    key_prefix: str
    key_name: str
    endpoint: str
    model: str
    upstream_model: str
    provider_kind: str
    deployment_id: int | None
    deployment_name: str
    outcome: str
    outcome_label: str
    status_code: int
    error_class: str
    input_tokens: int
    cached_input_tokens: int
    output_tokens: int
    reasoning_tokens: int
    usage_estimated: bool
    cost_nanos: int
    priced: bool
    price: PriceRates | None
    cache_hit: bool
    is_stream: bool
    attempts: int
    attempt_log: tuple[UpstreamAttempt, ...]
    latency_ms: int | None
    ttft_ms: int | None
    tags: tuple[str, ...]
    end_user: str
    started_at: datetime
    finished_at: datetime
    ingested_at: datetime
    has_bodies: bool


def _attempt_from(entry: object) -> UpstreamAttempt | None:
    """One stored attempt, or None if the row is not one (hand-edited, or a future shape)."""
    if not isinstance(entry, dict):
        return None
    try:
        return UpstreamAttempt(
            deployment_id=int(entry.get("deployment_id") or 0),
            deployment_name=str(entry.get("deployment_name", "")),
            provider_kind=str(entry.get("provider_kind", "")),
            outcome=str(entry.get("outcome", "")),
            status_code=int(entry.get("status_code") or 0),
            error_class=str(entry.get("error_class", "")),
            started_ms=int(entry.get("started_ms") or 0),
            duration_ms=int(entry.get("duration_ms") or 0),
            ttfb_ms=None if entry.get("ttfb_ms") is None else int(entry["ttfb_ms"]),
        )
    except (TypeError, ValueError):
        return None


def _price_rates(price: ModelPrice | None) -> PriceRates | None:
    if price is None:
        return None
    return PriceRates(
        price_id=price.pk, org_id=price.org_id, provider_kind=price.provider_kind,
        model=price.model, input_usd_per_mtok=price.input_usd_per_mtok,
        output_usd_per_mtok=price.output_usd_per_mtok,
        cached_input_usd_per_mtok=price.cached_input_usd_per_mtok,
        reasoning_usd_per_mtok=price.reasoning_usd_per_mtok,
        effective_from=price.effective_from, effective_until=price.effective_until,
    )  # fmt: skip


def request_detail(
    *, org_id: int, event_id: uuid.UUID, team_id: int | None = None
) -> RequestDetail | None:
    """One of the org's requests (of one team, with `team_id`), or None: another org's
    or team's request is as absent as one that never was. One query."""
    events = UsageEvent.objects.filter(org_id=org_id, pk=event_id)
    if team_id is not None:
        events = events.filter(team_id=team_id)
    stored_bodies = UsageEventBody.objects.filter(event_id=OuterRef("pk"))
    event = (
        events.select_related("key", "team", "price")
        .annotate(has_bodies=Exists(stored_bodies))
        .first()
    )
    if event is None:
        return None
    attempts = tuple(
        attempt for attempt in map(_attempt_from, event.attempt_log or ()) if attempt is not None
    )
    return RequestDetail(
        event_id=event.pk, org_id=event.org_id, team_id=event.team_id,
        team_name=event.team.name if event.team else "", key_id=event.key_id,
        key_prefix=event.key.prefix if event.key else "",
        key_name=event.key.name if event.key else "", endpoint=event.endpoint,
        model=event.model, upstream_model=event.upstream_model,
        provider_kind=event.provider_kind, deployment_id=event.deployment_id,
        deployment_name=event.deployment_name, outcome=event.outcome,
        outcome_label=event.get_outcome_display(), status_code=event.status_code,
        error_class=event.error_class, input_tokens=event.input_tokens,
        cached_input_tokens=event.cached_input_tokens, output_tokens=event.output_tokens,
        reasoning_tokens=event.reasoning_tokens, usage_estimated=event.usage_estimated,
        cost_nanos=event.cost_nanos, priced=event.priced, price=_price_rates(event.price),
        cache_hit=event.cache_hit, is_stream=event.is_stream, attempts=event.attempts,
        attempt_log=attempts, latency_ms=event.latency_ms, ttft_ms=event.ttft_ms,
        tags=tuple(distinct_tags(event.tags)), end_user=event.end_user,
        started_at=event.started_at, finished_at=event.finished_at,
        ingested_at=event.ingested_at, has_bodies=event.has_bodies,  # type: ignore[attr-defined]
    )  # fmt: skip


@dataclass(frozen=True, slots=True)
class StoredBodies:
    request: str
    request_truncated: bool
    response: str
    response_truncated: bool


def request_bodies(*, org_id: int, event_id: uuid.UUID) -> StoredBodies | None:
    """The logged bodies of one of the org's requests, if any were kept.

    Callers decide who may see them: bodies are for admins and the request's own team.
    """
    row = (
        UsageEventBody.objects.filter(org_id=org_id, event_id=event_id)
        .values_list("request_body", "request_truncated", "response_body", "response_truncated")
        .first()
    )
    return StoredBodies(*row) if row else None


# ---------------------------------------------------------------- overview
# The overview reads the rollups, plus the raw events the rollup job has not folded
# in yet: those started since the hour before its watermark (a small, recent slice,
# cheap on the started_at indexes), and the partial first hour of a day or month
# that starts off the hour in the org's time zone. Rollup rows and raw slices never
# overlap, so every figure is exact to the nano-dollar whenever the page is read.

OVERVIEW_TOP_LIMIT = 5
_HOUR = timedelta(hours=1)


@dataclass(frozen=True, slots=True)
class OverviewFigures:
    """Requests, errors, spend and latency of one period or one chart bucket."""

    requests: int
    errors: int
    cost_nanos: int
    latency_p50_ms: float | None
    latency_p95_ms: float | None
    ttft_p50_ms: float | None

    @classmethod
    def of(cls, measures: Measures) -> "OverviewFigures":
        counters = measures.counters
        return cls(
            requests=counters["requests"],
            errors=counters["requests"] - counters["successes"],
            cost_nanos=counters["cost_nanos"],
            latency_p50_ms=histogram_percentile(measures.latency_histogram, 50),
            latency_p95_ms=histogram_percentile(measures.latency_histogram, 95),
            ttft_p50_ms=histogram_percentile(measures.ttft_histogram, 50),
        )

    @property
    def error_rate_pct(self) -> float | None:
        """Failed requests as a percentage of all requests (None: no requests)."""
        return 100 * self.errors / self.requests if self.requests else None


@dataclass(frozen=True, slots=True)
class OverviewBucket:
    start: datetime  # UTC start of the hour or UTC day
    figures: OverviewFigures


@dataclass(frozen=True, slots=True)
class OverviewTop:
    """One of the costliest models, teams or keys of the period."""

    key: object  # the model name, team id or key id (None: no team / no key)
    label: str
    requests: int
    errors: int
    cost_nanos: int


@dataclass(frozen=True, slots=True)
class UsageOverview:
    today: OverviewFigures
    month_requests: int
    month_cost_nanos: int
    period: OverviewFigures  # the whole chart period
    series: list[OverviewBucket]  # every bucket of the chart period, oldest first
    top_models: list[OverviewTop]
    top_teams: list[OverviewTop]
    top_keys: list[OverviewTop]


@dataclass(frozen=True, slots=True)
class _Span:
    """[since, until) split at the rollups' edge: rollup hours [rolled_from, rolled_until),
    raw events before and after them."""

    since: datetime
    rolled_from: datetime
    rolled_until: datetime

    def rolled(self, hour: datetime) -> bool:
        return self.rolled_from <= hour < self.rolled_until

    def raw_events(self, until: datetime) -> Q:
        head = Q(started_at__gte=self.since, started_at__lt=self.rolled_from)
        return head | Q(started_at__gte=self.rolled_until, started_at__lt=until)


def rollups_complete_until() -> datetime | None:
    """The hour before which the rollups hold every ingested event (None: never built)."""
    watermark = RollupState.objects.filter(pk=1).values_list("ingested_through", flat=True).first()
    if watermark is None:
        return None
    # An event committed slowly around the last run may be missing from its hour.
    return hour_floor(watermark - LATE_COMMIT_MARGIN)


def _rollup_edge(until: datetime) -> datetime | None:
    edge = rollups_complete_until()
    return None if edge is None else min(edge, hour_floor(until))


def _span(since: datetime, edge: datetime | None) -> _Span:
    rolled_from = hour_floor(since) if hour_floor(since) == since else hour_floor(since) + _HOUR
    rolled_until = rolled_from if edge is None else max(rolled_from, edge)
    return _Span(since=since, rolled_from=rolled_from, rolled_until=rolled_until)


def _raw_groups(
    events: QuerySet[UsageEvent], spans: dict[str, _Span], until: datetime
) -> list[dict[str, Any]]:
    """Raw events of the spans' raw slices, grouped by UTC hour, model, team, key,
    outcome and latency/TTFT histogram bucket, flagged `in_<span>` per span (the
    first hour of a span can straddle its start)."""
    window = Q()
    for span in spans.values():
        window |= span.raw_events(until)
    flags = {
        f"in_{name}": Case(
            When(started_at__gte=span.since, then=Value(True)),
            default=Value(False),
            output_field=BooleanField(),
        )
        for name, span in spans.items()
    }
    dimensions = ("hour", *flags, "model", "team_id", "key_id", "outcome")
    return list(
        events.filter(window)
        .order_by()
        .annotate(
            hour=TruncHour("started_at", tzinfo=UTC),
            # Null latencies land in the last bucket but are not counted (Count skips nulls).
            latency_bucket=_bucket_of("latency_ms"),
            ttft_bucket=_bucket_of("ttft_ms"),
            **flags,
        )
        .values(*dimensions, "latency_bucket", "ttft_bucket")
        .annotate(
            n=Count("id"),
            cost=Sum("cost_nanos"),
            latency_n=Count("latency_ms"),
            ttft_n=Count("ttft_ms"),
        )
    )


def _raw_measures(row: dict[str, Any]) -> Measures:
    measures = Measures()
    measures.counters["requests"] = row["n"]
    if row["outcome"] == UsageEvent.Outcome.SUCCESS:
        measures.counters["successes"] = row["n"]
    measures.counters["cost_nanos"] = int(row["cost"] or 0)
    if row["latency_n"]:
        latency = [0] * row["latency_bucket"] + [row["latency_n"]]
        histogram_merge(measures.latency_histogram, latency)
    if row["ttft_n"]:
        histogram_merge(measures.ttft_histogram, [0] * row["ttft_bucket"] + [row["ttft_n"]])
    return measures


_TOP_DIMENSIONS = {"model": "model", "team": "team_id", "key": "key_id"}


@dataclass(slots=True)
class _Tally:
    """Measures added up per use, while rollup rows and raw groups are read once.

    The top lists only need cost, requests and successes, so groups keep just those;
    histograms are summed once per bucket at the end (MeasuresTotal), and the period's
    total is the sum of its buckets.
    """

    today: MeasuresTotal = field(default_factory=MeasuresTotal)
    month: MeasuresTotal = field(default_factory=MeasuresTotal)
    buckets: dict[datetime, MeasuresTotal] = field(default_factory=dict)
    # by -> group key -> [cost_nanos, requests, successes]
    groups: dict[str, dict[object, list[int]]] = field(
        default_factory=lambda: {by: {} for by in _TOP_DIMENSIONS}
    )

    def add_to_tops(self, row: dict[str, Any], counters: dict[str, int]) -> None:
        """`row` carries the top dimensions; `counters` its cost, requests and successes."""
        # Database sums of big integers can arrive as Decimal.
        cost, requests, successes = (
            int(counters[name] or 0) for name in ("cost_nanos", "requests", "successes")
        )
        for by, column in _TOP_DIMENSIONS.items():
            top = self.groups[by].setdefault(row[column], [0, 0, 0])
            top[0] += cost
            top[1] += requests
            top[2] += successes

    def bucket(self, start: datetime) -> MeasuresTotal:
        return self.buckets.setdefault(start, MeasuresTotal())

    def series(self) -> dict[datetime, Measures]:
        return {start: total.measures() for start, total in self.buckets.items()}

    def tops(self, by: str) -> list[OverviewTop]:
        def cost_then_requests(item: tuple[object, list[int]]) -> tuple[int, int]:
            return (-item[1][0], -item[1][1])

        best = sorted(self.groups[by].items(), key=cost_then_requests)[:OVERVIEW_TOP_LIMIT]
        if by == "model":
            labels = {key: str(key) for key, _ in best}
        else:  # one query, for the few shown
            labels = _labels(by, {key for key, _ in best if key is not None}, {})
        missing = "(no team)" if by == "team" else "(no key)" if by == "key" else "(none)"
        return [
            OverviewTop(
                key=key,
                label=labels.get(key) or missing,
                requests=requests,
                errors=requests - successes,
                cost_nanos=cost,
            )
            for key, (cost, requests, successes) in best
        ]


def _rollup_rows(
    *, org_id: int, team_id: int | None, spans: dict[str, _Span], daily: bool
) -> QuerySet[UsageTeamRollup]:
    """Team rollup rows of the chart period (day rows for its whole UTC days when daily)
    and the hour rows of today: a few per hour, whatever the number of keys."""
    period, today = spans["period"], spans["today"]
    hours = UsageTeamRollup.objects.filter(org_id=org_id, granularity=Granularity.HOUR)
    rows = hours.filter(bucket_start__gte=today.rolled_from, bucket_start__lt=today.rolled_until)
    if daily:
        rows |= _covering_rows(
            UsageTeamRollup, org_id=org_id, since=period.rolled_from, until=period.rolled_until
        )
    else:
        rows |= hours.filter(
            bucket_start__gte=period.rolled_from, bucket_start__lt=period.rolled_until
        )
    return rows if team_id is None else rows.filter(team_id=team_id)


def _rollup_tops(*, org_id: int, team_id: int | None, period: _Span) -> QuerySet[Any]:
    """Cost, requests and successes of the rolled-up period per model, team and key,
    summed by the database: a few hundred rows back, not one per key and hour."""
    rows = _covering_rows(
        UsageRollup, org_id=org_id, since=period.rolled_from, until=period.rolled_until
    )
    if team_id is not None:
        rows = rows.filter(team_id=team_id)
    return (
        rows.order_by()
        .values(*_TOP_DIMENSIONS.values())
        .annotate(
            cost_nanos=Sum("cost_nanos"), requests=Sum("requests"), successes=Sum("successes")
        )
    )


def _month_rollup_sums(*, org_id: int, team_id: int | None, month: _Span) -> Measures:
    sums = Measures()
    if month.rolled_until > month.rolled_from:
        rows = _covering_rows(
            UsageTeamRollup, org_id=org_id, since=month.rolled_from, until=month.rolled_until
        )
        if team_id is not None:
            rows = rows.filter(team_id=team_id)
        totals = rows.order_by().aggregate(requests=Sum("requests"), cost_nanos=Sum("cost_nanos"))
        sums.counters["requests"] = int(totals["requests"] or 0)
        sums.counters["cost_nanos"] = int(totals["cost_nanos"] or 0)
    return sums


def usage_overview(
    *, org_id: int, team_id: int | None = None, today_since: datetime, month_since: datetime,
    period_since: datetime, daily: bool, until: datetime,
) -> UsageOverview:  # fmt: skip
    """Today's and this month's figures, the chart period [period_since, until) per hour
    (or per UTC day when `daily`; `period_since` aligned to one), and its costliest
    models, teams and keys; narrowed to one team by `team_id`.

    Exact even before the rollup job has run for the latest events, in a handful of
    queries whatever the volume (rollup rows for all but the latest hour or so).
    """
    floor = day_floor if daily else hour_floor
    edge = _rollup_edge(until)
    spans = {
        "today": _span(today_since, edge),
        "month": _span(month_since, edge),
        "period": _span(period_since, edge),
    }
    today, month, period = spans["today"], spans["month"], spans["period"]
    tally = _Tally()
    if edge is not None:
        # Daily, the hour rows of the period are those of its last, partial UTC day.
        period_hours_from = day_floor(period.rolled_until) if daily else period.rolled_from
        rows = _rollup_rows(org_id=org_id, team_id=team_id, spans=spans, daily=daily)
        for row in _measure_rows(rows.order_by(), "granularity", "bucket_start"):
            start = row["bucket_start"]
            if row["granularity"] == Granularity.DAY:
                tally.bucket(start).add_row(row)
                continue
            if today.rolled(start):
                tally.today.add_row(row)
            if period_hours_from <= start < period.rolled_until:
                tally.bucket(floor(start)).add_row(row)
        if period.rolled_until > period.rolled_from:
            for row in _rollup_tops(org_id=org_id, team_id=team_id, period=period):
                tally.add_to_tops(row, row)
        tally.month.add(_month_rollup_sums(org_id=org_id, team_id=team_id, month=month))

    events = UsageEvent.objects.filter(org_id=org_id)
    if team_id is not None:
        events = events.filter(team_id=team_id)
    for row in _raw_groups(events, spans, until):
        measures, hour = _raw_measures(row), row["hour"]
        if row["in_today"] and not today.rolled(hour):
            tally.today.add(measures)
        if row["in_month"] and not month.rolled(hour):
            tally.month.add(measures)
        if row["in_period"] and not period.rolled(hour):
            tally.bucket(floor(hour)).add(measures)
            tally.add_to_tops(row, measures.counters)

    starts, start = [], floor(period_since)
    while start < until:
        starts.append(start)
        start += DAY if daily else _HOUR
    series = tally.series()
    period_total = MeasuresTotal()
    for measures in series.values():
        period_total.add(measures)
    return UsageOverview(
        today=OverviewFigures.of(tally.today.measures()),
        month_requests=tally.month.counters["requests"],
        month_cost_nanos=tally.month.counters["cost_nanos"],
        period=OverviewFigures.of(period_total.measures()),
        series=[
            OverviewBucket(start, OverviewFigures.of(series.get(start) or Measures()))
            for start in starts
        ],
        top_models=tally.tops("model"),
        top_teams=tally.tops("team"),
        top_keys=tally.tops("key"),
    )


def live_feed_requests(
    *, org_id: int, team_id: int | None = None, limit: int = 50
) -> list[RecentRequest]:
    """The org's (or one team's) latest requests, newest first, for the live feed."""
    events = UsageEvent.objects.filter(org_id=org_id)
    if team_id is not None:
        events = events.filter(team_id=team_id)
    rows = events.order_by("-started_at").values(*_RECENT_COLUMNS)[:limit]
    return [_recent_request(row) for row in rows]


def key_prefixes(*, org_id: int, key_ids: set[int]) -> dict[int, str]:
    """The visible prefixes of the org's keys among `key_ids` (never their secrets)."""
    found = VirtualKey.objects.filter(org_id=org_id, pk__in=key_ids).values_list("pk", "prefix")
    return dict(found)
