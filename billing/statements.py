"""Monthly statements: what an organization, and each of its teams, owes for a month.

A month closes once it has ended in the organization's time zone, plus a grace period for
events still on their way. Closing links every event of the organization that started
before the month's end and is not on a statement yet to the new statement: the month's own
events become usage lines, and events of earlier, already closed months that arrived late
become adjustment lines. An event is linked once, inside the closing transaction, so it is
billed on exactly one statement whatever the clocks or the order of commits; a closed
statement is never edited. The month still open is previewed by the same query, unsaved.

Amounts are exact nano-USD; cents appear only where a statement is shown, and the
difference between the rounded total and the sum of the rounded lines is shown as such.
"""

import calendar
from collections.abc import Iterator
from dataclasses import dataclass, fields, replace
from datetime import date, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal
from zoneinfo import ZoneInfo

from django.db import transaction
from django.db.models import Count, Q, QuerySet, Sum
from django.db.models.functions import TruncMonth
from django.utils import timezone

from billing.models import Statement, StatementLine, UsageEvent
from tenants.models import Organization, Team

NANOS_PER_CENT = 10**7


class StatementNotDue(Exception):
    """The month has not ended (plus grace), or an earlier month is still open."""


def month_start(day: date) -> date:
    return day.replace(day=1)


def next_month(month: date) -> date:
    days = calendar.monthrange(month.year, month.month)[1]
    return month.replace(day=1) + timedelta(days=days)


def month_bounds(month: date, time_zone: str) -> tuple[datetime, datetime]:
    """The month as [start, end) instants, by the calendar of `time_zone`."""
    zone = ZoneInfo(time_zone)
    start = datetime(month.year, month.month, 1, tzinfo=zone)
    end_day = next_month(month)
    end = datetime(end_day.year, end_day.month, 1, tzinfo=zone)
    return start, end


def cents(nanos: int) -> int:
    """Whole cents, rounded half up: the one place a statement rounds."""
    return int((Decimal(nanos) / NANOS_PER_CENT).quantize(Decimal(1), rounding=ROUND_HALF_UP))


@dataclass(frozen=True, slots=True)
class LineView:
    kind: str  # StatementLine.Kind
    usage_month: date
    team_id: int | None
    team_name: str
    provider_kind: str
    model: str
    requests: int
    input_tokens: int
    cached_input_tokens: int
    output_tokens: int
    reasoning_tokens: int
    unpriced_requests: int
    amount_nanos: int

    @property
    def amount_cents(self) -> int:
        return cents(self.amount_nanos)


@dataclass(frozen=True, slots=True)
class StatementView:
    """A statement as shown: closed (saved) or the open month's preview."""

    org_id: int
    month: date
    time_zone: str
    period_start: datetime
    period_end: datetime
    closed_at: datetime | None
    lines: tuple[LineView, ...]
    team_id: int | None = None  # a team's chargeback view: only its lines

    @property
    def is_closed(self) -> bool:
        return self.closed_at is not None

    @property
    def total_nanos(self) -> int:
        return sum(line.amount_nanos for line in self.lines)

    @property
    def usage_nanos(self) -> int:
        return sum(ln.amount_nanos for ln in self.lines if ln.kind == StatementLine.Kind.USAGE)

    @property
    def adjustment_nanos(self) -> int:
        return self.total_nanos - self.usage_nanos

    @property
    def total_cents(self) -> int:
        return cents(self.total_nanos)

    @property
    def rounding_cents(self) -> int:
        """Rounded total minus the sum of the rounded lines (shown on the statement)."""
        return self.total_cents - sum(line.amount_cents for line in self.lines)

    @property
    def unpriced_requests(self) -> int:
        return sum(line.unpriced_requests for line in self.lines)


# What a line holds, saved and shown alike.
_LINE_FIELDS = tuple(field.name for field in fields(LineView))

_MEASURES = {
    "requests": Count("id"),
    "input_tokens": Sum("input_tokens"),
    "cached_input_tokens": Sum("cached_input_tokens"),
    "output_tokens": Sum("output_tokens"),
    "reasoning_tokens": Sum("reasoning_tokens"),
    "unpriced_requests": Count("id", filter=Q(priced=False)),
    "amount_nanos": Sum("cost_nanos"),
}


def _lines(events: QuerySet[UsageEvent], month: date, time_zone: str) -> list[LineView]:
    """Events grouped into lines: by the month they belong to, team, provider and model."""
    rows = (
        events.order_by()
        .annotate(usage_month=TruncMonth("started_at", tzinfo=ZoneInfo(time_zone)))
        .values("usage_month", "team_id", "provider_kind", "model")
        .annotate(**_MEASURES)
    )
    team_names = dict(
        Team.objects.filter(pk__in={row["team_id"] for row in rows if row["team_id"]}).values_list(
            "pk", "name"
        )
    )
    lines = []
    for row in rows:
        usage_month = row["usage_month"]
        usage_month = usage_month.date() if isinstance(usage_month, datetime) else usage_month
        lines.append(
            LineView(
                kind=(
                    StatementLine.Kind.USAGE
                    if usage_month == month
                    else StatementLine.Kind.ADJUSTMENT
                ),
                usage_month=usage_month,
                team_id=row["team_id"],
                team_name=team_names.get(row["team_id"], "") if row["team_id"] else "",
                provider_kind=row["provider_kind"],
                model=row["model"],
                **{name: row[name] or 0 for name in _MEASURES},
            )
        )
    # Usage first, then adjustments by month; within each, teams, providers, models.
    lines.sort(
        key=lambda ln: (
            ln.kind != StatementLine.Kind.USAGE,
            ln.usage_month,
            ln.team_name,
            ln.provider_kind,
            ln.model,
        )
    )
    return lines


def _unbilled(org_id: int, before: datetime) -> QuerySet[UsageEvent]:
    return UsageEvent.objects.filter(org_id=org_id, statement__isnull=True, started_at__lt=before)


def statement_preview(*, org: Organization, month: date) -> StatementView:
    """The open month as it would close now (nothing is saved)."""
    month = month_start(month)
    start, end = month_bounds(month, org.time_zone)
    return StatementView(
        org_id=org.pk,
        month=month,
        time_zone=org.time_zone,
        period_start=start,
        period_end=end,
        closed_at=None,
        lines=tuple(_lines(_unbilled(org.pk, end), month, org.time_zone)),
    )


def _view_of(statement: Statement) -> StatementView:
    lines = tuple(
        LineView(**{name: getattr(line, name) for name in _LINE_FIELDS})
        for line in statement.lines.order_by("position")
    )
    return StatementView(
        org_id=statement.org_id,
        month=statement.month,
        time_zone=statement.time_zone,
        period_start=statement.period_start,
        period_end=statement.period_end,
        closed_at=statement.closed_at,
        lines=lines,
    )


def statement_view(*, org: Organization, month: date, team_id: int | None = None) -> StatementView:
    """The month's statement: the frozen one once closed, else the live preview.

    With `team_id`, only that team's lines (its chargeback statement).
    """
    month = month_start(month)
    statement = Statement.objects.filter(org=org, month=month).first()
    view = _view_of(statement) if statement else statement_preview(org=org, month=month)
    if team_id is None:
        return view
    return StatementView(
        org_id=view.org_id,
        month=view.month,
        time_zone=view.time_zone,
        period_start=view.period_start,
        period_end=view.period_end,
        closed_at=view.closed_at,
        lines=tuple(line for line in view.lines if line.team_id == team_id),
        team_id=team_id,
    )


def statement_first_open_month(*, org: Organization) -> date:
    """The oldest month that has no statement yet and will get one (months close in order):
    the month after the last statement, else the month of the oldest unbilled event, and
    never later than the current month in the org's time zone."""
    current = _local_month(timezone.now(), org.time_zone)
    last = Statement.objects.filter(org=org).order_by("-month").values_list("month", flat=True)
    if (last_month := last.first()) is not None:
        return min(next_month(last_month), current)
    unbilled = UsageEvent.objects.filter(org=org, statement__isnull=True).order_by("started_at")
    started_at = unbilled.values_list("started_at", flat=True).first()
    return current if started_at is None else min(_local_month(started_at, org.time_zone), current)


def statement_open_view(*, org: Organization, month: date, first_open: date) -> StatementView:
    """An open month as it will close. Late usage of closed months goes on the oldest
    open month's statement, so a later open month bills only its own usage (the raw
    preview counts every unbilled earlier event as late usage)."""
    view = statement_view(org=org, month=month)
    if view.month == first_open:
        return view
    return replace(view, lines=tuple(line for line in view.lines if line.usage_month == view.month))


def statement_close(
    *, org: Organization, month: date, now: datetime | None = None, grace: timedelta
) -> Statement:
    """Close and freeze the org's statement for `month`; closing twice returns the first.

    Refused (StatementNotDue) before the month has ended plus `grace`, or while an
    earlier month with events is still open: months close in order, so a late event is
    always an adjustment of a closed month.
    """
    now = now or timezone.now()
    month = month_start(month)
    start, end = month_bounds(month, org.time_zone)
    if now < end + grace:
        raise StatementNotDue(f"{month:%B %Y} can be closed from {end + grace:%Y-%m-%d %H:%M %Z}.")
    with transaction.atomic():
        # One closer per organization at a time.
        Organization.objects.select_for_update().get(pk=org.pk)
        existing = Statement.objects.filter(org=org, month=month).first()
        if existing is not None:
            return existing
        earlier = _unbilled(org.pk, start).order_by("started_at").first()
        if (
            earlier is not None
            and not Statement.objects.filter(
                org=org, month__gte=_local_month(earlier.started_at, org.time_zone), month__lt=month
            ).exists()
        ):
            raise StatementNotDue("An earlier month with usage is still open; close it first.")
        statement = Statement.objects.create(
            org=org,
            month=month,
            time_zone=org.time_zone,
            period_start=start,
            period_end=end,
            closed_at=now,
        )
        _unbilled(org.pk, end).update(statement=statement)
        lines = _lines(UsageEvent.objects.filter(statement=statement), month, org.time_zone)
        StatementLine.objects.bulk_create(
            StatementLine(
                statement=statement,
                position=position,
                **{name: getattr(line, name) for name in _LINE_FIELDS},
            )
            for position, line in enumerate(lines)
        )
        statement.total_nanos = sum(line.amount_nanos for line in lines)
        statement.save(update_fields=["total_nanos"])
    return statement


def _local_month(moment: datetime, time_zone: str) -> date:
    return moment.astimezone(ZoneInfo(time_zone)).date().replace(day=1)


def _due_months(org: Organization, now: datetime, grace: timedelta) -> Iterator[date]:
    """Months to close, oldest first: from the first unbilled event's month (or the month
    after the last closed statement) up to the last month that ended `grace` ago."""
    last = Statement.objects.filter(org=org).order_by("-month").first()
    first_unbilled = _unbilled(org.pk, now).order_by("started_at").first()
    candidates = []
    if last is not None:
        candidates.append(next_month(last.month))
    if first_unbilled is not None:
        candidates.append(_local_month(first_unbilled.started_at, org.time_zone))
    if not candidates:
        return
    month = min(candidates)
    while month_bounds(month, org.time_zone)[1] + grace <= now:
        yield month
        month = next_month(month)


def statements_close_due(*, now: datetime | None = None, grace: timedelta) -> list[Statement]:
    """Close every organization's months that are due, oldest first (the beat task)."""
    now = now or timezone.now()
    closed = []
    for org in Organization.objects.order_by("pk"):
        for month in _due_months(org, now, grace):
            if not Statement.objects.filter(org=org, month=month).exists():
                closed.append(statement_close(org=org, month=month, now=now, grace=grace))
    return closed
