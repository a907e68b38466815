"""Finance pages: cost reports over any period, and monthly statements, on screen and as CSV.

Reports read the hourly rollups, so a report covers whole UTC hours: the days asked for
(in the org's time zone) become instants rounded down to the hour, and the page says which
instants it covers. Every page also offers the raw requests behind its figures as CSV,
so each number can be traced to the events it was summed from.
"""

import csv
import dataclasses
import io
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

from asgiref.sync import sync_to_async
from django.http import Http404, HttpRequest, HttpResponse, QueryDict, StreamingHttpResponse
from django.urls import reverse
from django.utils import timezone
from django.utils.http import urlencode

from billing.pricing import usd_exact
from billing.rollups import hour_floor
from billing.selectors import (
    LEDGER_PAGE_SIZE,
    NO_TEAM,
    LedgerEntry,
    StatementSummary,
    UsageSummary,
    ledger_page,
    spend_per_day,
    statements_list,
    usage_by_end_user,
    usage_report,
)
from billing.statements import (
    LineView,
    StatementView,
    month_bounds,
    statement_first_open_month,
    statement_open_view,
    statement_view,
)
from dashboard.access import FINANCE_ROLES, Viewer, org_page, render_page
from tenants.models import Organization

# Group-by choices: the rollup breakdowns finance asks for, plus end users (raw events).
GROUPS = {
    "team": "Team",
    "key": "Key",
    "model": "Model",
    "provider": "Provider",
    "deployment": "Deployment",
    "tag": "Tag",
    "end_user": "End user",
}
END_USERS_ON_SCREEN = 100
END_USERS_IN_CSV = 1_000_000
# Dates outside these are typos, and would overflow time zone arithmetic near year 1.
FIRST_DAY, LAST_DAY = date(2000, 1, 1), date(2100, 12, 31)
MAX_REPORT_DAYS = 731  # two years
OPEN_MONTHS_LISTED = 12


class BadRequest(Exception):
    """Input the page cannot answer; the message says what to change."""


def _local_today(org: Organization) -> date:
    return timezone.now().astimezone(ZoneInfo(org.time_zone)).date()


# ------------------------------------------------------------------ formatting


def dollars_of_cents(cents: int, *, signed: bool = False) -> str:
    """Whole cents as "$1,234.56" ("+$0.01" / "-$0.01" with `signed`)."""
    sign = "-" if cents < 0 else ("+" if signed and cents > 0 else "")
    return f"{sign}${Decimal(abs(cents)).scaleb(-2):,.2f}"


def _cell(text: str) -> str:
    """A text cell safe to open in a spreadsheet: client-chosen values (end-user ids,
    tags, names) starting like a formula are prefixed with an apostrophe."""
    return f"'{text}" if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


def _csv_response(filename: str, rows: Iterable[Sequence[object]]) -> HttpResponse:
    response = HttpResponse(content_type="text/csv; charset=utf-8")
    response["Content-Disposition"] = f'attachment; filename="{filename}"'
    csv.writer(response).writerows(rows)
    return response


def _ms(value: float | None) -> str:
    return "" if value is None else f"{value:.1f}"


# ------------------------------------------------------------------ requests behind a figure

LEDGER_HEADER = (
    "event_id", "started_at_utc", "local_month", "team_id", "team", "key_prefix", "key_name",
    "endpoint", "model", "provider", "deployment", "upstream_model", "outcome", "status_code",
    "input_tokens", "cached_input_tokens", "output_tokens", "reasoning_tokens", "priced",
    "cost_nanos", "cost_usd", "tags", "end_user",
)  # fmt: skip


def _ledger_row(entry: LedgerEntry, zone: ZoneInfo) -> list[object]:
    return [
        entry.event_id, entry.started_at.astimezone(UTC).isoformat(),
        f"{entry.started_at.astimezone(zone):%Y-%m}", entry.team_id or "",
        _cell(entry.team_name), entry.key_prefix, _cell(entry.key_name), entry.endpoint,
        _cell(entry.model), entry.provider_kind, _cell(entry.deployment_name),
        _cell(entry.upstream_model), entry.outcome, entry.status_code, entry.input_tokens,
        entry.cached_input_tokens, entry.output_tokens, entry.reasoning_tokens,
        "yes" if entry.priced else "no", entry.cost_nanos, usd_exact(entry.cost_nanos),
        _cell(";".join(entry.tags)), _cell(entry.end_user),
    ]  # fmt: skip


def _ledger_csv_response(
    filename: str, org: Organization, query: dict[str, Any], *, time_zone: str
) -> StreamingHttpResponse:
    """Stream the org's events matching `query` (ledger_page filters), page by page:
    a month of raw events can be millions of rows, never held in memory at once."""
    zone = ZoneInfo(time_zone)

    async def lines() -> AsyncIterator[str]:
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(LEDGER_HEADER)
        after = None
        while True:
            page = await sync_to_async(ledger_page)(
                org_id=org.pk, after=after, limit=LEDGER_PAGE_SIZE, **query
            )
            writer.writerows(_ledger_row(entry, zone) for entry in page)
            yield buffer.getvalue()
            buffer.seek(0)
            buffer.truncate()
            if len(page) < LEDGER_PAGE_SIZE:
                break
            after = (page[-1].started_at, page[-1].event_id)

    response = StreamingHttpResponse(lines(), content_type="text/csv; charset=utf-8")
    response["Content-Disposition"] = f'attachment; filename="{filename}"'
    return response


# ------------------------------------------------------------------ cost reports


@dataclass(frozen=True, slots=True)
class ReportQuery:
    first_day: date  # inclusive, in the org's time zone
    last_day: date  # inclusive
    since: datetime  # what the rollups cover: whole UTC hours
    until: datetime
    by: str
    format: str


def report_query(params: QueryDict, org: Organization) -> ReportQuery:
    """The report asked for by the query string; BadRequest says what is wrong with it."""
    today = _local_today(org)
    first_day = _date_param(params, "since", "From")
    last_day = _date_param(params, "until", "To")
    if first_day is None:
        first_day = last_day.replace(day=1) if last_day else today.replace(day=1)
    if last_day is None:
        last_day = max(today, first_day)
    if last_day < first_day:
        raise BadRequest(f"“To” ({last_day}) is before “From” ({first_day}).")
    if (last_day - first_day).days + 1 > MAX_REPORT_DAYS:
        raise BadRequest(f"A report covers at most two years ({MAX_REPORT_DAYS} days).")
    by = params.get("by") or "team"
    if by not in GROUPS:
        raise BadRequest(f"Unknown grouping “{by}”; use one of: {', '.join(GROUPS)}.")
    output = params.get("format") or "html"
    if output not in ("html", "csv", "requests"):
        raise BadRequest(f"Unknown format “{output}”; use csv or requests.")
    zone = ZoneInfo(org.time_zone)
    since = datetime.combine(first_day, time(), zone)
    until = datetime.combine(last_day + timedelta(days=1), time(), zone)
    return ReportQuery(
        first_day=first_day,
        last_day=last_day,
        since=hour_floor(since),
        until=hour_floor(until),
        by=by,
        format=output,
    )


def _date_param(params: QueryDict, name: str, label: str) -> date | None:
    raw = params.get(name, "").strip()
    if not raw:
        return None
    try:
        day = date.fromisoformat(raw)
    except ValueError:
        raise BadRequest(f"“{label}” must be a date like 2025-03-31, not “{raw[:40]}”.") from None
    if not FIRST_DAY <= day <= LAST_DAY:
        raise BadRequest(f"“{label}” must be between {FIRST_DAY} and {LAST_DAY}.")
    return day


@dataclass(frozen=True, slots=True)
class ReportRow:
    key: object
    label: str
    requests: int
    errors: int
    input_tokens: int
    output_tokens: int
    cost_nanos: int
    unpriced_requests: int | None  # None: not known for this grouping (end users)
    latency_p50_ms: float | None
    latency_p95_ms: float | None

    @classmethod
    def of(cls, summary: UsageSummary) -> "ReportRow":
        return cls(
            key=summary.key,
            label=summary.label,
            requests=summary.requests,
            errors=summary.errors,
            input_tokens=summary.input_tokens,
            output_tokens=summary.output_tokens,
            cost_nanos=summary.cost_nanos,
            unpriced_requests=summary.unpriced_requests,
            latency_p50_ms=summary.latency_p50_ms,
            latency_p95_ms=summary.latency_p95_ms,
        )


def _report_rows(
    org: Organization, query: ReportQuery, *, limit: int
) -> tuple[list[ReportRow], ReportRow]:
    """The report's rows and its total row (of all requests)."""
    if query.by != "end_user":
        summaries, total = usage_report(
            org_id=org.pk, since=query.since, until=query.until, by=query.by, ttft=False
        )
        return [ReportRow.of(summary) for summary in summaries], ReportRow.of(total)
    total = ReportRow.of(
        usage_report(org_id=org.pk, since=query.since, until=query.until, ttft=False)[1]
    )
    users = usage_by_end_user(org_id=org.pk, since=query.since, until=query.until, limit=limit)
    return [
        ReportRow(
            key=user.end_user,
            label=user.end_user,
            requests=user.requests,
            errors=user.errors,
            input_tokens=user.input_tokens,
            output_tokens=user.output_tokens,
            cost_nanos=user.cost_nanos,
            unpriced_requests=None,
            latency_p50_ms=None,
            latency_p95_ms=None,
        )  # fmt: skip
        for user in users
    ], total


def _report_filename(org: Organization, query: ReportQuery, what: str) -> str:
    return f"tollgate-{org.slug}-{what}-{query.first_day}-to-{query.last_day}.csv"


def _report_csv(org: Organization, query: ReportQuery) -> HttpResponse:
    rows, total = _report_rows(org, query, limit=END_USERS_IN_CSV)
    header = [
        query.by, "group_id", "requests", "errors", "input_tokens", "output_tokens",
        "cost_nanos", "cost_usd", "unpriced_requests", "latency_p50_ms", "latency_p95_ms",
    ]  # fmt: skip

    def line(label: str, key: object, row: ReportRow) -> list[object]:
        return [
            _cell(label), _cell("" if key is None else str(key)), row.requests, row.errors,
            row.input_tokens, row.output_tokens, row.cost_nanos, usd_exact(row.cost_nanos),
            "" if row.unpriced_requests is None else row.unpriced_requests,
            _ms(row.latency_p50_ms), _ms(row.latency_p95_ms),
        ]  # fmt: skip

    total_label = {
        "tag": "TOTAL (all requests; tag groups overlap)",
        "end_user": "TOTAL (all requests, with or without an end user)",
    }.get(query.by, "TOTAL")
    body = [line(row.label, row.key, row) for row in rows]
    return _csv_response(
        _report_filename(org, query, f"costs-by-{query.by}"),
        [header, *body, line(total_label, None, total)],
    )


def _share(part: int, whole: int) -> float:
    """`part` as a percentage of `whole`, for the share bars (display only)."""
    return round(100 * part / whole, 1) if whole > 0 else 0.0


def _preset_links(org: Organization, by: str) -> list[tuple[str, str]]:
    today = _local_today(org)
    this_month = today.replace(day=1)
    last_month = (this_month - timedelta(days=1)).replace(day=1)
    presets = [
        ("This month", this_month, today),
        ("Last month", last_month, this_month - timedelta(days=1)),
        ("Last 7 days", today - timedelta(days=6), today),
    ]
    base = reverse("dashboard:reports")
    return [
        (label, f"{base}?{urlencode({'org': org.slug, 'since': s, 'until': u, 'by': by})}")
        for label, s, u in presets
    ]


finance_page = org_page(
    FINANCE_ROLES, refusal="Cost reports and statements are for owners, admins and finance."
)


@finance_page
def reports(request: HttpRequest, viewer: Viewer) -> HttpResponse:
    """Usage and cost of one org over any period, grouped; CSV of the table or the requests."""
    org = viewer.org
    try:
        query = report_query(request.GET, org)
    except BadRequest as error:
        today = _local_today(org)
        context = {
            "error": str(error), "groups": GROUPS,
            "since": request.GET.get("since", "")[:40] or today.replace(day=1),
            "until": request.GET.get("until", "")[:40] or today,
            "by": request.GET.get("by", "team"), "presets": _preset_links(org, "team"),
        }  # fmt: skip
        return render_page(request, viewer, "dashboard/reports.html", context, status=400)
    if query.format == "csv":
        return _report_csv(org, query)
    if query.format == "requests":
        window = {"since": query.since, "until": query.until}
        filename = _report_filename(org, query, "requests")
        return _ledger_csv_response(filename, org, window, time_zone=org.time_zone)

    rows, total = _report_rows(org, query, limit=END_USERS_ON_SCREEN)
    days = spend_per_day(org_id=org.pk, since=query.since, until=query.until)
    params = {"org": org.slug, "since": query.first_day, "until": query.last_day, "by": query.by}
    context = {
        "groups": GROUPS,
        "since": query.first_day,
        "until": query.last_day,
        "by": query.by,
        "group_label": GROUPS[query.by],
        "covers_from": query.since,  # shown in the org's time zone
        "covers_until": query.until,
        "rows": rows,
        "rows_with_share": [(row, _share(row.cost_nanos, total.cost_nanos)) for row in rows],
        "total": total,
        "chart": {
            "t": [int(day.day.timestamp()) for day in days],
            "spend_nanos": [day.cost_nanos for day in days],
            "requests": [day.requests for day in days],
        },
        "days": days,
        "end_user_limit": END_USERS_ON_SCREEN,
        "presets": _preset_links(org, query.by),
        "csv_url": f"?{urlencode({**params, 'format': 'csv'})}",
        "requests_url": f"?{urlencode({**params, 'format': 'requests'})}",
    }
    return render_page(request, viewer, "dashboard/reports.html", context)


# ------------------------------------------------------------------ statements


def _month_param(raw: str) -> date:
    try:
        month = datetime.strptime(raw, "%Y-%m").date()
    except ValueError:
        raise Http404("No such month.") from None
    if not FIRST_DAY <= month <= LAST_DAY:
        raise Http404("No such month.")
    return month


def _teams(org: Organization, view: StatementView) -> list[tuple[int, str]]:
    """Teams to pick for chargeback: the org's teams, plus teams gone since (named on lines)."""
    teams = dict(org.teams.order_by("name").values_list("pk", "name"))
    for line in view.lines:
        if line.team_id is not None and line.team_id not in teams:
            teams[line.team_id] = line.team_name or f"team #{line.team_id}"
    return sorted(teams.items(), key=lambda item: item[1].lower())


def _team_param(raw: str) -> int | str | None:
    if not raw:
        return None
    if raw == NO_TEAM:
        return NO_TEAM
    try:
        return int(raw)
    except ValueError:
        raise BadRequest("“team” must be a team id, or “none” for usage without a team.") from None


@finance_page
def statements(request: HttpRequest, viewer: Viewer) -> HttpResponse:
    """The org's closed statements, newest first, under the open month(s) previewed."""
    org = viewer.org
    closed = statements_list(org_id=org.pk)
    first_open = statement_first_open_month(org=org)
    current = _local_today(org).replace(day=1)
    open_months = []
    month = current
    while month >= first_open and len(open_months) < OPEN_MONTHS_LISTED:
        open_months.append(statement_open_view(org=org, month=month, first_open=first_open))
        month = (month - timedelta(days=1)).replace(day=1)
    context = {
        "open_months": open_months,
        "more_open": month >= first_open,
        "closed": closed,
    }
    return render_page(request, viewer, "dashboard/statements.html", context)


@dataclass(frozen=True, slots=True)
class LineRow:
    """A statement line as shown: its label, and its amount rounded to cents."""

    line: LineView
    label: str
    rounded: str


def _line_label(line: LineView) -> str:
    return "Usage" if line.kind == "usage" else f"Late usage from {line.usage_month:%B %Y}"


def _statement_csv(view: StatementView, filename: str) -> HttpResponse:
    header = [
        "kind", "label", "usage_month", "team_id", "team", "provider", "model", "requests",
        "input_tokens", "cached_input_tokens", "output_tokens", "reasoning_tokens",
        "unpriced_requests", "amount_nanos", "amount_usd", "amount_cents",
    ]  # fmt: skip
    rows: list[list[object]] = [header]
    for line in view.lines:
        rows.append([
            line.kind, _line_label(line), f"{line.usage_month:%Y-%m}", line.team_id or "",
            _cell(line.team_name), line.provider_kind, _cell(line.model), line.requests,
            line.input_tokens, line.cached_input_tokens, line.output_tokens,
            line.reasoning_tokens, line.unpriced_requests, line.amount_nanos,
            usd_exact(line.amount_nanos), line.amount_cents,
        ])  # fmt: skip
    rows.append([
        "total", "Total", f"{view.month:%Y-%m}", "", "", "", "",
        sum(line.requests for line in view.lines),
        sum(line.input_tokens for line in view.lines),
        sum(line.cached_input_tokens for line in view.lines),
        sum(line.output_tokens for line in view.lines),
        sum(line.reasoning_tokens for line in view.lines),
        view.unpriced_requests, view.total_nanos, usd_exact(view.total_nanos), view.total_cents,
    ])  # fmt: skip
    rows.append([
        "rounding", "Rounding (rounded total minus the sum of the rounded lines)",
        f"{view.month:%Y-%m}", "", "", "", "", "", "", "", "", "", "", "", "",
        view.rounding_cents,
    ])  # fmt: skip
    return _csv_response(filename, rows)


def _statement_requests(
    org: Organization, view: StatementView, closed: StatementSummary | None, first_open: date,
    team: int | str | None, filename: str,
) -> StreamingHttpResponse:  # fmt: skip
    """The events behind the statement's lines: linked to it once closed; for a preview,
    the unbilled events its lines count (see _open_preview)."""
    if closed is not None:
        query: dict[str, Any] = {"statement_id": closed.statement_id, "team": team}
    else:
        start, end = month_bounds(view.month, org.time_zone)
        query = {"unbilled": True, "until": end, "team": team}
        if view.month != first_open:
            query["since"] = start  # late usage goes on the oldest open month only
    return _ledger_csv_response(filename, org, query, time_zone=view.time_zone)


@finance_page
def statement(request: HttpRequest, viewer: Viewer, month: str) -> HttpResponse:
    """One month's statement (the org's, or one team's with ?team=): printable, CSV."""
    org = viewer.org
    wanted = _month_param(month)
    closed = next((s for s in statements_list(org_id=org.pk) if s.month == wanted), None)
    first_open = statement_first_open_month(org=org)
    current = _local_today(org).replace(day=1)
    if closed is None and not first_open <= wanted <= current:
        raise Http404(f"There is no statement for {wanted:%B %Y}.")
    try:
        team = _team_param(request.GET.get("team", ""))
        output = request.GET.get("format") or "html"
        if output not in ("html", "csv", "requests"):
            raise BadRequest(f"Unknown format “{output}”; use csv or requests.")
    except BadRequest as error:
        context = {"error": str(error)}
        return render_page(request, viewer, "dashboard/statement.html", context, status=400)

    if closed is None:
        whole = statement_open_view(org=org, month=wanted, first_open=first_open)
    else:
        whole = statement_view(org=org, month=wanted)
    teams = _teams(org, whole)
    team_name = None
    view = whole
    if team == NO_TEAM:
        team_name = "No team"
        view = dataclasses.replace(whole, lines=tuple(ln for ln in whole.lines if not ln.team_id))
    elif team is not None:
        team_name = dict(teams).get(int(team))
        if team_name is None:
            raise Http404("No such team in this organization.")
        view = dataclasses.replace(
            whole, lines=tuple(ln for ln in whole.lines if ln.team_id == team), team_id=int(team)
        )

    team_slug = "" if team is None else f"-team-{team}"
    status = "" if closed else "-preview"
    filename = f"tollgate-{org.slug}-statement-{wanted:%Y-%m}{team_slug}{status}.csv"
    if output == "csv":
        return _statement_csv(view, filename)
    if output == "requests":
        return _statement_requests(
            org, view, closed, first_open, team, filename.replace("-statement-", "-requests-")
        )

    params = {"org": org.slug, **({"team": team} if team is not None else {})}
    context = {
        "view": view,
        "zone_name": view.time_zone,  # the statement's own: it is frozen with it
        "rows": [
            LineRow(line=line, label=_line_label(line), rounded=dollars_of_cents(line.amount_cents))
            for line in view.lines
        ],
        "lines_cents": dollars_of_cents(sum(line.amount_cents for line in view.lines)),
        "rounding": dollars_of_cents(view.rounding_cents, signed=True),
        "total_rounded": dollars_of_cents(view.total_cents),
        "total_requests": sum(line.requests for line in view.lines),
        "total_input_tokens": sum(line.input_tokens for line in view.lines),
        "total_output_tokens": sum(line.output_tokens for line in view.lines),
        "teams": teams,
        "team": "" if team is None else str(team),
        "team_name": team_name,
        "no_team": NO_TEAM,
        "csv_url": f"?{urlencode({**params, 'format': 'csv'})}",
        "requests_url": f"?{urlencode({**params, 'format': 'requests'})}",
    }
    return render_page(request, viewer, "dashboard/statement.html", context)
