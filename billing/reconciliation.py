"""Checking rollups against the raw events, and pruning events once that holds.

Reconciliation compares, per organization and UTC day, the request, token and
cost totals of the hour and day rollups (all, per tag and per team) with the
raw events. A difference is an alert: it is logged at ERROR, recorded as a
`ReconciliationRun` (listed in the admin), and the day is rebuilt.

Retention deletes raw events older than `TOLLGATE_USAGE_RETENTION_DAYS`, one UTC
day at a time, and only once that day's rollups have just reconciled exactly.
Rollups are kept forever.
"""

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from django.conf import settings
from django.db import transaction
from django.db.models import Count, QuerySet, Sum
from django.db.models.functions import TruncDay
from django.utils import timezone

from billing.models import (
    ReconciliationRun,
    RollupMeasures,
    UsageEvent,
    UsageRollup,
    UsageTagRollup,
    UsageTeamRollup,
)
from billing.rollups import (
    DAY,
    day_floor,
    distinct_tags,
    locked_state,
    rollup_state,
    rollups_rebuild,
    rollups_refresh,
)

logger = logging.getLogger(__name__)

Granularity = RollupMeasures.Granularity
FIGURES = (
    "requests", "input_tokens", "cached_input_tokens", "output_tokens", "reasoning_tokens",
    "cost_nanos",
)  # fmt: skip
TAG_FIGURES = ("requests", "cost_nanos")

# (org id, UTC day) -> figure -> value
Figures = dict[tuple[int, datetime], dict[str, int]]


def _event_figures(since: datetime, until: datetime) -> Figures:
    events = UsageEvent.objects.filter(started_at__gte=since, started_at__lt=until).order_by()
    rows = (
        events.annotate(day=TruncDay("started_at", tzinfo=UTC))
        .values("org_id", "day")
        .annotate(requests=Count("id"), **{name: Sum(name) for name in FIGURES[1:]})
    )
    return {
        (row["org_id"], row["day"]): {name: int(row[name] or 0) for name in FIGURES} for row in rows
    }


def _tag_event_figures(since: datetime, until: datetime) -> Figures:
    """What the tag rollups must add up to: each event once per distinct tag."""
    events = UsageEvent.objects.filter(started_at__gte=since, started_at__lt=until).order_by()
    rows = (
        events.exclude(tags=[])
        .annotate(day=TruncDay("started_at", tzinfo=UTC))
        .values("org_id", "day", "tags")
        .annotate(requests=Count("id"), cost_nanos=Sum("cost_nanos"))
    )
    figures: Figures = {}
    for row in rows:
        tag_count = len(distinct_tags(row["tags"]))
        totals = figures.setdefault((row["org_id"], row["day"]), dict.fromkeys(TAG_FIGURES, 0))
        for name in TAG_FIGURES:
            totals[name] += int(row[name] or 0) * tag_count
    return figures


def _rollup_figures(
    model: type[RollupMeasures], granularity: str, since: datetime, until: datetime,
    figures: tuple[str, ...],
) -> Figures:  # fmt: skip
    rows = (
        model._default_manager.filter(
            granularity=granularity, bucket_start__gte=since, bucket_start__lt=until
        )
        .order_by()
        .annotate(day=TruncDay("bucket_start", tzinfo=UTC))
        .values("org_id", "day")
        .annotate(**{name: Sum(name) for name in figures})
    )
    return {
        (row["org_id"], row["day"]): {name: int(row[name] or 0) for name in figures} for row in rows
    }


def _differences(
    expected: Figures, actual: Figures, figures: tuple[str, ...], source: str
) -> Iterator[dict[str, Any]]:
    for org_id, day in sorted(expected.keys() | actual.keys()):
        for name in figures:
            want = expected.get((org_id, day), {}).get(name, 0)
            have = actual.get((org_id, day), {}).get(name, 0)
            if want != have:
                yield {
                    "org_id": org_id, "day": day.date().isoformat(), "source": source,
                    "figure": name, "events": want, "rollups": have,
                }  # fmt: skip


def rollup_mismatches(*, since: datetime, until: datetime) -> list[dict[str, Any]]:
    """Every org, UTC day and figure in [since, until) where rollups and events differ."""
    events, tag_events = _event_figures(since, until), _tag_event_figures(since, until)
    mismatches: list[dict[str, Any]] = []
    for model, expected, figures, label in (
        (UsageRollup, events, FIGURES, ""),
        (UsageTagRollup, tag_events, TAG_FIGURES, "tag "),
        (UsageTeamRollup, events, FIGURES, "team "),
    ):
        for granularity in (Granularity.HOUR, Granularity.DAY):
            actual = _rollup_figures(model, granularity, since, until, figures)
            source = f"{granularity} {label}rollups"
            mismatches.extend(_differences(expected, actual, figures, source))
    return mismatches


def _day_ceiling(moment: datetime) -> datetime:
    floor = day_floor(moment)
    return floor if floor == moment else floor + DAY


def rollups_reconcile(
    *, since: datetime, until: datetime, trigger: str = ReconciliationRun.Trigger.MANUAL
) -> ReconciliationRun:
    """Check the UTC days in [since, until) and rebuild any that differ; record the run.

    Days whose raw events were pruned cannot be checked and are left out.
    """
    started_at = timezone.now()
    since, until = day_floor(since), max(day_floor(since), _day_ceiling(until))
    pruned_before = rollup_state().pruned_before
    if pruned_before is not None and since < pruned_before:
        since = min(pruned_before, until)
    rollups_refresh()  # events ingested since the last refresh are not a mismatch
    mismatches = rollup_mismatches(since=since, until=until)
    status = ReconciliationRun.Status.CLEAN
    if mismatches:
        logger.error(
            "Rollups differ from the raw events for %d figure(s) between %s and %s, "
            "e.g. %s; rebuilding the affected days",
            len(mismatches), since.date(), until.date(), mismatches[0],
        )  # fmt: skip
        days = sorted({datetime.fromisoformat(m["day"]).replace(tzinfo=UTC) for m in mismatches})
        for day in days:
            rollups_rebuild(since=day, until=day + DAY)
        remaining = [
            mismatch for day in days for mismatch in rollup_mismatches(since=day, until=day + DAY)
        ]
        status = ReconciliationRun.Status.REPAIRED
        if remaining:
            status = ReconciliationRun.Status.FAILED
            logger.error(
                "Rollups still differ from the raw events after a rebuild: %s", remaining[0]
            )
    return ReconciliationRun.objects.create(
        period_start=since, period_end=until, trigger=trigger, status=status,
        days_checked=(until - since).days, mismatches=mismatches,
        started_at=started_at, finished_at=timezone.now(),
    )  # fmt: skip


def rollups_reconcile_recent(*, days: int = 2) -> ReconciliationRun:
    """The daily check: the last `days` complete UTC days."""
    today = day_floor(timezone.now())
    return rollups_reconcile(
        since=today - days * DAY, until=today, trigger=ReconciliationRun.Trigger.SCHEDULE
    )


@dataclass(frozen=True, slots=True)
class PruneResult:
    days: int  # UTC days whose raw events were deleted
    events: int  # events deleted
    blocked_on: datetime | None  # the first day left alone because it did not reconcile


def _delete_in_batches(events: QuerySet[UsageEvent], batch_size: int) -> int:
    deleted = 0
    while ids := list(events.order_by().values_list("id", flat=True)[:batch_size]):
        # Logged bodies cascade with their events; count the events alone.
        _, by_model = UsageEvent.objects.filter(id__in=ids).delete()
        deleted += by_model.get(UsageEvent._meta.label, 0)
    return deleted


def usage_events_prune(*, now: datetime | None = None, batch_size: int = 5000) -> PruneResult:
    """Delete raw events older than the retention period, day by day, once each day reconciles.

    Stops at the first day that does not reconcile, so the pruned days stay one
    contiguous range before `RollupState.pruned_before`.
    """
    now = now or timezone.now()
    cutoff = day_floor(now - settings.TOLLGATE_USAGE_RETENTION_DAYS * DAY)
    old = UsageEvent.objects.filter(started_at__lt=cutoff)
    pruned_before = rollup_state().pruned_before
    if pruned_before is not None:
        # Older leftovers arrived after their day was pruned; the refresh logged them.
        old = old.filter(started_at__gte=pruned_before)
    oldest = old.order_by("started_at").values_list("started_at", flat=True).first()
    days = events = 0
    day = day_floor(oldest) if oldest is not None else cutoff
    while day < cutoff:
        next_day = day + DAY
        in_day = UsageEvent.objects.filter(started_at__gte=day, started_at__lt=next_day)
        if in_day.exists():
            run = rollups_reconcile(
                since=day, until=next_day, trigger=ReconciliationRun.Trigger.RETENTION
            )
            if run.status == ReconciliationRun.Status.FAILED:
                return PruneResult(days=days, events=events, blocked_on=day)
            with transaction.atomic():
                # Holding the lock, no rebuild runs: check once more and mark the
                # day pruned, so no later rebuild recomputes it from what is left.
                state = locked_state()
                marked_at = timezone.now()
                if rollup_mismatches(since=day, until=next_day):
                    logger.error("Usage for %s changed while it was reconciled", day.date())
                    return PruneResult(days=days, events=events, blocked_on=day)
                state.pruned_before = max(state.pruned_before or next_day, next_day)
                state.save(update_fields=["pruned_before", "updated_at"])
            events += _delete_in_batches(in_day.filter(ingested_at__lte=marked_at), batch_size)
            days += 1
        day = next_day
    if days:
        logger.info("Pruned %d usage events from %d day(s) before %s", events, days, cutoff.date())
    return PruneResult(days=days, events=events, blocked_on=None)
