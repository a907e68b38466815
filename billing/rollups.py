"""Hourly and daily usage rollups, rebuilt exactly from the raw events.

A bucket is never incremented: it is deleted and rebuilt from the events that
started in it, in one transaction, so a rebuild can run any number of times and
rollup totals always equal the ledger's, to the nano-dollar. Which hours to
rebuild comes from `ingested_at`: any hour that gained an event since the last
run is rebuilt, so an event ingested late is folded into its own hour and day.
Day rows (UTC days) are sums of the day's hour rows. Team rows are sums of the
same bucket's rows per org and team, built with them.
"""

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from itertools import zip_longest
from typing import Any

from django.db import transaction
from django.db.models import Case, Count, IntegerField, Q, QuerySet, Sum, Value, When
from django.db.models.functions import TruncHour
from django.utils import timezone

from billing.models import (
    RollupMeasures,
    RollupState,
    UsageEvent,
    UsageRollup,
    UsageTagRollup,
    UsageTeamRollup,
)

logger = logging.getLogger(__name__)

HOUR = timedelta(hours=1)
DAY = timedelta(days=1)
Granularity = RollupMeasures.Granularity
Outcome = UsageEvent.Outcome

# An event's ingested_at is set just before its batch commits, so the next run
# looks this far behind its own watermark: a slow commit is still seen.
LATE_COMMIT_MARGIN = timedelta(minutes=5)


def _histogram_edges() -> tuple[int, ...]:
    """Lower bounds (ms) of the latency buckets: 1 ms steps up to 10 ms, then ~20 % wide.

    Stored histograms index into these edges: changing them means rebuilding
    every rollup (`manage.py rollups_recompute --all`).
    """
    edges, edge = [0], 1
    while edge <= 3_600_000:
        edges.append(edge)
        edge = max(edge + 1, round(edge * 1.2))
    return tuple(edges)


HISTOGRAM_EDGES_MS = _histogram_edges()


def histogram_bucket(value_ms: int) -> int:
    """The index of the bucket that holds `value_ms`."""
    low, high = 0, len(HISTOGRAM_EDGES_MS) - 1
    while low < high:
        middle = (low + high + 1) // 2
        if HISTOGRAM_EDGES_MS[middle] <= value_ms:
            low = middle
        else:
            high = middle - 1
    return low


def histogram_merge(into: list[int], other: Sequence[int]) -> list[int]:
    """Add `other`'s bucket counts into `into` (padding it as needed) and return it."""
    if len(other) > len(into):
        into.extend([0] * (len(other) - len(into)))
    for index, count in enumerate(other):
        if count:  # most buckets of a small rollup row are empty
            into[index] += count
    return into


def histogram_percentile(histogram: list[int], percentile: float) -> float | None:
    """The `percentile` (0-100) of the values counted in `histogram`, in ms.

    Exact to within the bucket holding the true value: the nearest-rank value's
    bucket is found exactly, then the rank is interpolated linearly inside it.
    """
    total = sum(histogram)
    if total == 0:
        return None
    rank = max(1, -(-percentile * total // 100))  # ceil, without floats for whole percents
    seen = 0
    for index, count in enumerate(histogram):
        if count and seen + count >= rank:
            low = HISTOGRAM_EDGES_MS[index]
            high = HISTOGRAM_EDGES_MS[index + 1] - 1 if index + 1 < len(HISTOGRAM_EDGES_MS) else low
            return low + (high - low) * (rank - seen - 0.5) / count
        seen += count
    return None  # unreachable: the counts add up to total


def _bucket_of(field_name: str) -> Case:
    """SQL for a column's histogram bucket: exact integer comparisons on every database."""
    edges = HISTOGRAM_EDGES_MS
    return Case(
        *(When(**{f"{field_name}__lt": edge}, then=Value(i)) for i, edge in enumerate(edges[1:])),
        default=Value(len(edges) - 1),
        output_field=IntegerField(),
    )


# What every rollup row sums, beside its histograms and error classes.
COUNTERS = (
    "requests", "successes", "client_errors", "upstream_errors", "blocked",
    "input_tokens", "cached_input_tokens", "output_tokens", "reasoning_tokens",
    "cost_nanos", "unpriced_requests", "cache_hits",
    "latency_count", "latency_sum_ms", "ttft_count", "ttft_sum_ms",
)  # fmt: skip
# Group keys: the columns an event is rolled up by.
ROLLUP_DIMENSIONS = (
    "org_id", "team_id", "key_id", "model", "provider_kind",
    "deployment_id", "deployment_name", "endpoint",
)  # fmt: skip
TAG_ROLLUP_DIMENSIONS = ("org_id", "model", "provider_kind", "tag")
TEAM_ROLLUP_DIMENSIONS = ("org_id", "team_id")
# Every rollup table and its group keys; team rows are sums of rollup rows.
ROLLUP_TABLES: tuple[tuple[type[RollupMeasures], tuple[str, ...]], ...] = (
    (UsageRollup, ROLLUP_DIMENSIONS),
    (UsageTagRollup, TAG_ROLLUP_DIMENSIONS),
    (UsageTeamRollup, TEAM_ROLLUP_DIMENSIONS),
)


def _counter_aggregates() -> dict[str, Any]:
    return {
        "requests": Count("id"),
        "successes": Count("id", filter=Q(outcome=Outcome.SUCCESS)),
        "client_errors": Count("id", filter=Q(outcome=Outcome.CLIENT_ERROR)),
        "upstream_errors": Count("id", filter=Q(outcome=Outcome.UPSTREAM_ERROR)),
        "blocked": Count("id", filter=Q(outcome=Outcome.BLOCKED)),
        "input_tokens": Sum("input_tokens"),
        "cached_input_tokens": Sum("cached_input_tokens"),
        "output_tokens": Sum("output_tokens"),
        "reasoning_tokens": Sum("reasoning_tokens"),
        "cost_nanos": Sum("cost_nanos"),
        "unpriced_requests": Count("id", filter=Q(priced=False)),
        "cache_hits": Count("id", filter=Q(cache_hit=True)),
        "latency_count": Count("latency_ms"),
        "latency_sum_ms": Sum("latency_ms"),
        "ttft_count": Count("ttft_ms"),
        "ttft_sum_ms": Sum("ttft_ms"),
    }


@dataclass(slots=True)
class Measures:
    """A rollup row's measures while they are being added up."""

    counters: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTERS, 0))
    errors_by_class: dict[str, int] = field(default_factory=dict)
    latency_histogram: list[int] = field(default_factory=list)
    ttft_histogram: list[int] = field(default_factory=list)

    @classmethod
    def of(cls, row: dict[str, Any]) -> "Measures":
        """From a row of counters (None is 0; PostgreSQL sums arrive as Decimal)."""
        measures = cls(counters={name: int(row.get(name) or 0) for name in COUNTERS})
        measures.errors_by_class = dict(row.get("errors_by_class") or {})
        measures.latency_histogram = list(row.get("latency_histogram") or [])
        measures.ttft_histogram = list(row.get("ttft_histogram") or [])
        return measures

    def add(self, other: "Measures") -> None:
        for name, value in other.counters.items():
            self.counters[name] += value
        for error_class, count in other.errors_by_class.items():
            self.errors_by_class[error_class] = self.errors_by_class.get(error_class, 0) + count
        histogram_merge(self.latency_histogram, other.latency_histogram)
        histogram_merge(self.ttft_histogram, other.ttft_histogram)

    def fields(self) -> dict[str, Any]:
        return {
            **self.counters,
            "errors_by_class": self.errors_by_class,
            "latency_histogram": self.latency_histogram,
            "ttft_histogram": self.ttft_histogram,
        }


def histograms_sum(histograms: Sequence[Sequence[int]]) -> list[int]:
    """Bucket-wise sum of many histograms at once: the columns are added in C, far
    faster than merging thousands of rows one by one."""
    return [sum(column) for column in zip_longest(*histograms, fillvalue=0)]


@dataclass(slots=True)
class MeasuresTotal:
    """Many rows' measures added up (a page reading thousands of rollup rows): counters
    as rows come, histograms kept aside and summed once, in `measures()`."""

    counters: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTERS, 0))
    errors_by_class: dict[str, int] = field(default_factory=dict)
    latency: list[Sequence[int]] = field(default_factory=list)
    ttft: list[Sequence[int]] = field(default_factory=list)

    def add_row(self, row: dict[str, Any]) -> None:
        """Add a rollup row as read with `.values(*COUNTERS, "errors_by_class", ...)`."""
        counters = self.counters
        for name in COUNTERS:
            counters[name] += int(row[name] or 0)
        for error_class, count in (row["errors_by_class"] or {}).items():
            self.errors_by_class[error_class] = self.errors_by_class.get(error_class, 0) + count
        if row["latency_histogram"]:
            self.latency.append(row["latency_histogram"])
        if row["ttft_histogram"]:
            self.ttft.append(row["ttft_histogram"])

    def add(self, measures: Measures) -> None:
        self.add_row(measures.fields())

    def measures(self) -> Measures:
        return Measures(
            counters=dict(self.counters),
            errors_by_class=dict(self.errors_by_class),
            latency_histogram=histograms_sum(self.latency),
            ttft_histogram=histograms_sum(self.ttft),
        )


Groups = dict[tuple[Any, ...], Measures]


def _group_key(row: dict[str, Any], dimensions: tuple[str, ...]) -> tuple[Any, ...]:
    return tuple(tuple(row[d]) if d == "tags" else row[d] for d in dimensions)


def _aggregate(events: QuerySet[UsageEvent], dimensions: tuple[str, ...]) -> Groups:
    """Measures of `events` per distinct value of `dimensions`, computed by the database."""
    events = events.order_by()
    groups: Groups = {
        _group_key(row, dimensions): Measures.of(row)
        for row in events.values(*dimensions).annotate(**_counter_aggregates())
    }

    def group_of(row: dict[str, Any]) -> Measures | None:
        # A group missing here gained its first event between two queries: the
        # event was ingested within LATE_COMMIT_MARGIN, so the next run counts it.
        return groups.get(_group_key(row, dimensions))

    failed = events.exclude(outcome=Outcome.SUCCESS).values(*dimensions, "error_class")
    for row in failed.annotate(n=Count("id")):
        if (measures := group_of(row)) is not None:
            error_class = row["error_class"] or "unknown"
            measures.errors_by_class[error_class] = (
                measures.errors_by_class.get(error_class, 0) + row["n"]
            )
    for column, attribute in (("latency_ms", "latency_histogram"), ("ttft_ms", "ttft_histogram")):
        counted = (
            events.filter(**{f"{column}__isnull": False})
            .annotate(bucket=_bucket_of(column))
            .values(*dimensions, "bucket")
            .annotate(n=Count("id"))
        )
        for row in counted:
            if (measures := group_of(row)) is not None:
                histogram = getattr(measures, attribute)
                histogram_merge(histogram, [0] * row["bucket"] + [row["n"]])
    return groups


def distinct_tags(tags: object) -> list[str]:
    """An event's tags, each once (the proxy already deduplicates; imports may not)."""
    if not isinstance(tags, list):
        return []
    return list(dict.fromkeys(str(tag) for tag in tags))


def regroup(groups: Groups, dimensions: tuple[str, ...], into: tuple[str, ...]) -> Groups:
    """`groups` keyed by `dimensions`, added up by the fewer dimensions `into`."""
    positions = [dimensions.index(name) for name in into]
    coarse: Groups = {}
    for key, measures in groups.items():
        coarse.setdefault(tuple(key[i] for i in positions), Measures()).add(measures)
    return coarse


def _hour_groups(hour: datetime) -> dict[type[RollupMeasures], Groups]:
    """Each rollup table's measures for the events that started in `hour`."""
    events = UsageEvent.objects.filter(started_at__gte=hour, started_at__lt=hour + HOUR)
    groups = _aggregate(events, ROLLUP_DIMENSIONS)
    # Grouping by the whole tag list keeps this one portable query; each
    # combination's measures are then counted once under each of its tags.
    tag_groups: Groups = {}
    by_tag_list = _aggregate(events.exclude(tags=[]), ("org_id", "model", "provider_kind", "tags"))
    for (*dimensions, tags), measures in by_tag_list.items():
        for tag in distinct_tags(list(tags)):
            tag_groups.setdefault((*dimensions, tag), Measures()).add(measures)
    return {
        UsageRollup: groups,
        UsageTagRollup: tag_groups,
        UsageTeamRollup: regroup(groups, ROLLUP_DIMENSIONS, TEAM_ROLLUP_DIMENSIONS),
    }


def _rows(
    model: type[RollupMeasures], dimensions: tuple[str, ...], groups: Groups, *,
    granularity: str, bucket_start: datetime, computed_at: datetime,
) -> list[Any]:  # fmt: skip
    return [
        model(
            granularity=granularity,
            bucket_start=bucket_start,
            computed_at=computed_at,
            **dict(zip(dimensions, key, strict=True)),
            **measures.fields(),
        )  # fmt: skip
        for key, measures in groups.items()
    ]


def locked_state() -> RollupState:
    """The rollup state row, locked until the transaction ends: one rebuild at a time."""
    RollupState.objects.get_or_create(pk=1)
    return RollupState.objects.select_for_update().get(pk=1)


def rollup_state() -> RollupState:
    return RollupState.objects.get_or_create(pk=1)[0]


def _is_pruned(state: RollupState, bucket_start: datetime) -> bool:
    return state.pruned_before is not None and bucket_start < state.pruned_before


def _replace(
    model: type[RollupMeasures], granularity: str, start: datetime, rows: list[Any]
) -> None:
    model._default_manager.filter(granularity=granularity, bucket_start=start).delete()
    model._default_manager.bulk_create(rows, batch_size=500)


def rollup_hour_rebuild(hour: datetime) -> bool:
    """Rebuild one hour's rollups from its events; False if its events were pruned."""
    with transaction.atomic():
        state = locked_state()
        if _is_pruned(state, hour):
            return False
        groups = _hour_groups(hour)
        common = {"granularity": Granularity.HOUR, "bucket_start": hour}
        now = timezone.now()
        for model, dimensions in ROLLUP_TABLES:
            rows = _rows(model, dimensions, groups[model], **common, computed_at=now)
            _replace(model, Granularity.HOUR, hour, rows)
    return True


def _sum_hours(model: type[RollupMeasures], dimensions: tuple[str, ...], day: datetime) -> Groups:
    hours = model._default_manager.filter(
        granularity=Granularity.HOUR, bucket_start__gte=day, bucket_start__lt=day + DAY
    ).values(*dimensions, *COUNTERS, "errors_by_class", "latency_histogram", "ttft_histogram")
    groups: Groups = {}
    for row in hours:
        groups.setdefault(_group_key(row, dimensions), Measures()).add(Measures.of(row))
    return groups


def rollup_day_rebuild(day: datetime) -> bool:
    """Rebuild one UTC day's rollups as the sum of its hours; False if it was pruned."""
    with transaction.atomic():
        state = locked_state()
        if _is_pruned(state, day):
            return False
        common = {"granularity": Granularity.DAY, "bucket_start": day}
        now = timezone.now()
        for model, dimensions in ROLLUP_TABLES:
            groups = _sum_hours(model, dimensions, day)
            rows = _rows(model, dimensions, groups, **common, computed_at=now)
            _replace(model, Granularity.DAY, day, rows)
    return True


def hour_floor(moment: datetime) -> datetime:
    return moment.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


def day_floor(moment: datetime) -> datetime:
    return hour_floor(moment).replace(hour=0)


@dataclass(frozen=True, slots=True)
class RebuildResult:
    hours: int  # hour buckets rebuilt
    days: int  # day buckets rebuilt
    pruned_hours_skipped: int  # hours whose raw events were already pruned


Progress = Callable[[int, int], None]


def rollups_rebuild_hours(
    hours: Iterable[datetime], *, progress: Progress | None = None
) -> RebuildResult:
    """Rebuild these hours, then the UTC days they fall in. `progress(done, total)` per hour."""
    ordered = sorted(set(hours))
    days: set[datetime] = set()
    skipped: list[datetime] = []
    for done, hour in enumerate(ordered, start=1):
        if rollup_hour_rebuild(hour):
            days.add(day_floor(hour))
        else:
            skipped.append(hour)
        if progress is not None:
            progress(done, len(ordered))
    rebuilt_days = sum(rollup_day_rebuild(day) for day in sorted(days))
    if skipped:
        # Never rebuilt from what is left: that would drop the pruned events.
        logger.error(
            "Events arrived for %d hour(s) whose raw events were already pruned "
            "(first %s); they are kept in the ledger but not folded into the rollups",
            len(skipped), skipped[0].isoformat(),
        )  # fmt: skip
    return RebuildResult(
        hours=len(ordered) - len(skipped), days=rebuilt_days, pruned_hours_skipped=len(skipped)
    )


def _started_hours(events: QuerySet[UsageEvent]) -> set[datetime]:
    hours = events.order_by().annotate(hour=TruncHour("started_at", tzinfo=UTC))
    return set(hours.values_list("hour", flat=True).distinct())


def rollups_refresh(*, now: datetime | None = None) -> RebuildResult:
    """Rebuild every hour (and day) that gained events since the last refresh.

    Idempotent: a run that fails half way is simply repeated by the next one,
    because the watermark moves only after every bucket was rebuilt.
    """
    now = now or timezone.now()
    watermark = rollup_state().ingested_through
    events = UsageEvent.objects.all()
    if watermark is not None:
        events = events.filter(ingested_at__gt=watermark - LATE_COMMIT_MARGIN)
    result = rollups_rebuild_hours(_started_hours(events))
    _advance_watermark(now)
    return result


def _advance_watermark(moment: datetime) -> None:
    with transaction.atomic():
        state = locked_state()
        if state.ingested_through is None or state.ingested_through < moment:
            state.ingested_through = moment
            state.save(update_fields=["ingested_through", "updated_at"])


def rollup_hours_between(since: datetime | None, until: datetime | None) -> set[datetime]:
    """Hours in [since, until) (None: unbounded) holding events or any rollup row, whose
    events are kept. Hours with rollups but no events any more are included, so a rebuild
    clears them (a day row's start counts as an hour, so its day is rebuilt too)."""
    pruned_before = rollup_state().pruned_before
    if since is not None:
        since = hour_floor(since)
    if pruned_before is not None:
        since = pruned_before if since is None else max(since, pruned_before)
    window = Q()
    if since is not None:
        window &= Q(bucket_start__gte=since)
    if until is not None:
        window &= Q(bucket_start__lt=until)
    events = UsageEvent.objects.all()
    if since is not None:
        events = events.filter(started_at__gte=since)
    if until is not None:
        events = events.filter(started_at__lt=until)
    hours = _started_hours(events)
    for model, _ in ROLLUP_TABLES:
        built = model._default_manager.filter(window).order_by()
        hours.update(built.values_list("bucket_start", flat=True).distinct())
    return hours


def rollups_rebuild(
    *, since: datetime | None, until: datetime | None, progress: Progress | None = None
) -> RebuildResult:
    """Rebuild every rollup in [since, until) from the raw events (a recompute).

    With neither bound it is a backfill of everything still in the ledger, after
    which the refresh task starts from now instead of scanning it all again.
    """
    started = timezone.now()
    result = rollups_rebuild_hours(rollup_hours_between(since, until), progress=progress)
    if since is None and until is None:
        _advance_watermark(started)
    return result
