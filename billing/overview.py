"""Reads for the dashboard overview and its live feed.

The overview reads the rollups, plus the raw events the rollup job has not folded in
yet: those started since the hour before its watermark (a small, recent slice, cheap
on the started_at indexes), and the partial first hour of a day or month that starts
off the hour in the org's time zone. Rollup rows and raw slices never overlap, so
every figure is exact to the nano-dollar whenever the page is read.
"""

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from django.db.models import (
    BooleanField,
    Case,
    Count,
    Q,
    QuerySet,
    Sum,
    Value,
    When,
)
from django.db.models.functions import TruncHour

from billing.models import (
    RollupMeasures,
    UsageEvent,
    UsageRollup,
    UsageTeamRollup,
)
from billing.rollups import (
    DAY,
    Measures,
    MeasuresTotal,
    _bucket_of,
    day_floor,
    histogram_merge,
    histogram_percentile,
    hour_floor,
)
from billing.selectors import (
    covering_rows,
    group_labels,
    measure_rows,
    rollups_complete_until,
)
from tenants.models import VirtualKey

Granularity = RollupMeasures.Granularity


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
            labels = group_labels(by, {key for key, _ in best if key is not None}, {})
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
        rows |= covering_rows(
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
    rows = covering_rows(
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
        rows = covering_rows(
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
        for row in measure_rows(rows.order_by(), "granularity", "bucket_start"):
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
