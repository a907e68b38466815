"""The request log: every proxied request, newest first, and one request in full.

Members see their own team's requests only; everyone else the whole org. Bodies (for
orgs that log them) are shown to owners and admins, and to members for their team's
requests; finance sees metadata only. Times are shown and entered in the org's time zone.
"""

import json
import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

from django import forms
from django.http import Http404, HttpRequest, HttpResponse
from django.urls import path
from django.utils import timezone

from billing.bodies import body_log_max_bytes, body_log_retention_days
from billing.models import UsageEvent
from billing.request_log import (
    REQUEST_LOG_PAGE_SIZE,
    KeyChoice,
    RequestDetail,
    RequestLogFilter,
    StoredBodies,
    request_bodies,
    request_detail,
    request_log_keys,
    request_log_models,
    request_log_page,
    request_log_teams,
)
from dashboard.access import ALL_ROLES, Viewer, org_page, render_page

Outcome = UsageEvent.Outcome
# The proxy's tag rule (routing.proxy.steps): the dashboard cannot import routing's internals.
_TAG = re.compile(r"\A[A-Za-z0-9_.:/-]{1,64}\Z")  # RegexField searches: anchored
# Status codes the gateway answers with, offered as exact filters.
STATUS_CODES = (200, 400, 401, 403, 404, 408, 413, 422, 429, 499, 500, 502, 503, 504)
MODELS_SUGGESTED_DAYS = 90
_DATETIME_LOCAL = "%Y-%m-%dT%H:%M"


class RequestLogFilterForm(forms.Form):
    """The filters above the log; times are in the org's time zone (validate under
    `timezone.override`)."""

    key = forms.TypedChoiceField(label="Key", required=False, coerce=int, empty_value=None)
    team = forms.TypedChoiceField(label="Team", required=False, coerce=int, empty_value=None)
    model = forms.CharField(
        label="Model",
        required=False,
        max_length=200,
        widget=forms.TextInput(attrs={"list": "request-log-models"}),
    )
    status = forms.ChoiceField(label="Status", required=False)
    tag = forms.RegexField(
        label="Tag",
        required=False,
        regex=_TAG,
        error_messages={"invalid": "Tags are 1-64 letters, digits or _ . : / -."},
    )
    since = forms.DateTimeField(
        label="From",
        required=False,
        widget=forms.DateTimeInput(attrs={"type": "datetime-local"}, format=_DATETIME_LOCAL),
    )
    until = forms.DateTimeField(
        label="To",
        required=False,
        widget=forms.DateTimeInput(attrs={"type": "datetime-local"}, format=_DATETIME_LOCAL),
    )
    user = forms.CharField(label="End user", required=False, max_length=256)

    def __init__(
        self, data: object, *, keys: list[tuple[str, str]], teams: list[tuple[str, str]] | None
    ) -> None:
        super().__init__(data, label_suffix="")  # type: ignore[arg-type]
        self.fields["key"].choices = [("", "Any key"), *keys]
        if teams is None:
            del self.fields["team"]  # members: their own team only
        else:
            self.fields["team"].choices = [("", "Any team"), *teams]
        self.fields["status"].choices = [
            ("", "Any status"),
            ("Outcome", [(value, label) for value, label in Outcome.choices]),
            ("Exact status code", [(str(code), str(code)) for code in STATUS_CODES]),
        ]

    def clean(self) -> dict[str, object]:
        cleaned = super().clean() or {}
        since, until = cleaned.get("since"), cleaned.get("until")
        if since and until and until <= since:
            self.add_error("until", "Give a time after “From”.")
        return cleaned

    def to_filter(self, *, team_id: int | None) -> RequestLogFilter:
        """The selector's filter; `team_id` (a member's own team) overrides the form's."""
        data = self.cleaned_data
        status = data.get("status") or ""
        return RequestLogFilter(
            key_id=data.get("key"),
            team_id=team_id if team_id is not None else data.get("team"),
            model=(data.get("model") or "").strip(),
            outcome=status if status in Outcome.values else "",
            status_code=int(status) if status.isdigit() else None,
            tag=data.get("tag") or "",
            end_user=(data.get("user") or "").strip(),
            since=data.get("since"),
            until=data.get("until"),
        )


# ------------------------------------------------------------------ paging


def cursor_encode(started_at: datetime, event_id: uuid.UUID) -> str:
    """The `before` parameter for the page after an entry: its time and id."""
    return f"{started_at.astimezone(UTC).isoformat()}|{event_id.hex}"


def cursor_decode(value: str) -> tuple[datetime, uuid.UUID] | None:
    """`before` read back; None (the newest page) for anything malformed."""
    moment, _, event_id = value.partition("|")
    try:
        started_at, parsed_id = datetime.fromisoformat(moment), uuid.UUID(event_id)
    except ValueError:
        return None
    return (started_at, parsed_id) if started_at.tzinfo is not None else None


def _member_scope(viewer: Viewer) -> int | None:
    """The team a member is limited to; 404 for a member without one (nothing is theirs)."""
    if not viewer.is_member:
        return None
    if viewer.team_id is None:
        raise Http404("You are not in a team, so no requests are yours to see.")
    return viewer.team_id


# ------------------------------------------------------------------ pages


def _key_choice(key: KeyChoice) -> tuple[str, str]:
    revoked = " (revoked)" if key.revoked else ""
    return str(key.key_id), f"{key.name} – {key.prefix}{revoked}"


@org_page(ALL_ROLES)
def requests_list(request: HttpRequest, viewer: Viewer) -> HttpResponse:
    """The org's requests (a member's: their team's), newest first, filtered and paged."""
    org = viewer.org
    team_scope = viewer.team_id if viewer.is_member else None
    if viewer.is_member and team_scope is None:
        return render_page(request, viewer, "dashboard/requests.html", {"no_team": True})
    keys = request_log_keys(org_id=org.pk, team_id=team_scope)
    teams = None
    if not viewer.is_member:
        teams = [(str(pk), name) for pk, name in request_log_teams(org_id=org.pk)]
    form = RequestLogFilterForm(request.GET, keys=[_key_choice(k) for k in keys], teams=teams)
    zone = ZoneInfo(org.time_zone)
    with timezone.override(zone):
        valid = form.is_valid()
    filters = {k: v for k, v in request.GET.items() if k not in ("org", "before") and v}
    entries, older = [], None
    if valid:
        before = cursor_decode(request.GET.get("before", ""))
        page = request_log_page(
            org_id=org.pk,
            filters=form.to_filter(team_id=team_scope),
            before=before,
            limit=REQUEST_LOG_PAGE_SIZE + 1,
        )
        entries = page[:REQUEST_LOG_PAGE_SIZE]
        if len(page) > REQUEST_LOG_PAGE_SIZE:
            last = entries[-1]
            cursor = cursor_encode(last.started_at, last.event_id)
            older = viewer.url("dashboard:requests", before=cursor, **filters)
    context = {
        "form": form,
        "entries": entries,
        "older_url": older,
        "paged": "before" in request.GET,
        "newest_url": viewer.url("dashboard:requests", **filters),
        "filtered": bool(filters),
        "models": request_log_models(
            org_id=org.pk, since=timezone.now() - timedelta(days=MODELS_SUGGESTED_DAYS)
        ),
        "base_url": request.build_absolute_uri("/v1"),
    }
    return render_page(request, viewer, "dashboard/requests.html", context)


@dataclass(frozen=True)
class LatencyBreakdown:
    """Where a request's time went, in milliseconds."""

    total_ms: int | None
    ttft_ms: int | None
    failed_attempts_ms: int
    final_attempt_ms: int | None
    final_answered: bool
    elsewhere_ms: int | None  # in the gateway and waiting between attempts


def latency_breakdown(detail: RequestDetail) -> LatencyBreakdown:
    """Time in failed attempts vs the last one, and the rest (gateway, backoff waits)."""
    attempts = detail.attempt_log
    failed = sum(attempt.duration_ms for attempt in attempts[:-1])
    final = attempts[-1] if attempts else None
    elsewhere = None
    if detail.latency_ms is not None and attempts:
        elsewhere = max(detail.latency_ms - failed - final.duration_ms, 0)  # type: ignore[union-attr]
    return LatencyBreakdown(
        total_ms=detail.latency_ms,
        ttft_ms=detail.ttft_ms,
        failed_attempts_ms=failed,
        final_attempt_ms=final.duration_ms if final else None,
        final_answered=final is not None and final.outcome == Outcome.SUCCESS,
        elsewhere_ms=elsewhere,
    )


@dataclass(frozen=True)
class ShownBody:
    text: str
    is_json: bool
    truncated: bool


def shown_body(text: str, truncated: bool) -> ShownBody:
    """A body as the page shows it: JSON pretty-printed when it parses, else as stored."""
    try:
        parsed = json.loads(text)
    except ValueError:
        return ShownBody(text=text, is_json=False, truncated=truncated)
    return ShownBody(
        text=json.dumps(parsed, indent=2, ensure_ascii=False), is_json=True, truncated=truncated
    )


def _bodies_shown(bodies: StoredBodies | None) -> dict[str, ShownBody] | None:
    if bodies is None:
        return None
    return {
        "request": shown_body(bodies.request, bodies.request_truncated),
        "response": shown_body(bodies.response, bodies.response_truncated),
    }


@org_page(ALL_ROLES)
def request_detail_page(request: HttpRequest, viewer: Viewer, event_id: uuid.UUID) -> HttpResponse:
    """One request in full: facts, attempts, latency, cost and (to those allowed) bodies."""
    org = viewer.org
    detail = request_detail(org_id=org.pk, event_id=event_id, team_id=_member_scope(viewer))
    if detail is None:
        raise Http404("No such request.")
    # Members only ever reach their own team's requests (above), so they may see bodies.
    may_see_bodies = viewer.is_admin or viewer.is_member
    bodies = None
    if may_see_bodies and detail.has_bodies:
        bodies = _bodies_shown(request_bodies(org_id=org.pk, event_id=detail.event_id))
    context = {
        "event": detail,
        "latency": latency_breakdown(detail),
        "may_see_bodies": may_see_bodies,
        "bodies": bodies,
        "body_logging_on": org.log_request_bodies,
        "body_max_kib": body_log_max_bytes() // 1024,
        "body_retention_days": body_log_retention_days(),
        "back_url": viewer.url("dashboard:requests"),
    }
    return render_page(request, viewer, "dashboard/requests_detail.html", context)


urlpatterns = [
    path("requests/", requests_list, name="requests"),
    path("requests/<uuid:event_id>/", request_detail_page, name="requests_detail"),
]
