"""The audit log: every administrative change in the organization, newest first.

Keyset pagination on (created_at, id) walks the `audit_org_created` index, so
page 1,000 costs what page 1 costs and nothing counts the whole table. Each
entry shows only the fields that changed; values are escaped by the template,
and any field whose name suggests a secret is masked here even though the
services never record one (a second line of defence).
"""

import json
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from django.apps import apps
from django.db.models import Q, QuerySet
from django.http import HttpRequest, HttpResponse
from django.urls import path

from dashboard.access import FINANCE_ROLES, Viewer, org_page, render_page
from tenants.models import AuditLog, Membership

PAGE_SIZE = 50
# Apps whose models appear as audit targets (target_type is the model's label_lower).
TARGET_APPS = ("tenants", "billing", "routing")
SECRET_HINTS = ("secret", "password", "token", "api_key", "plaintext", "credential")
# Suggestions for the action filter (a prefix such as "membership" matches all of its kind).
KNOWN_ACTIONS = (
    "organization.update", "membership.set", "membership.change", "membership.remove",
    "invitation.create", "invitation.accept", "invitation.revoke", "virtual_key.issue",
    "virtual_key.revoke", "budget.create", "alert_channel.create", "alert_channel.update",
    "alert_channel.enable", "alert_channel.disable", "alert_channel.rotate_secret",
    "alert_channel.delete", "alert_channel.test",
)  # fmt: skip
_MISSING = object()
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


@dataclass(frozen=True)
class AuditFilters:
    action: str = ""
    actor: str = ""  # a user id, or "system" for changes made without a user
    target_type: str = ""
    since: date | None = None
    until: date | None = None  # inclusive


@dataclass(frozen=True)
class Change:
    field: str
    before: str
    after: str


@dataclass(frozen=True)
class Cursor:
    """Where a page ends: the last entry's time (µs since the epoch) and id."""

    created_us: int
    pk: int

    def __str__(self) -> str:
        return f"{self.created_us}-{self.pk}"

    @classmethod
    def parse(cls, text: str) -> "Cursor | None":
        created, _, pk = text.partition("-")
        if not (created.isdigit() and pk.isdigit()):
            return None
        return cls(int(created), int(pk))

    @classmethod
    def after(cls, entry: AuditLog) -> "Cursor":
        return cls((entry.created_at - _EPOCH) // _MICROSECOND, entry.pk)

    @property
    def created_at(self) -> datetime:
        return _EPOCH + self.created_us * _MICROSECOND


def target_type_choices() -> list[tuple[str, str]]:
    """Every model that can be an audit target, by name (no query)."""
    models = [model for label in TARGET_APPS for model in apps.get_app_config(label).get_models()]
    return sorted(
        ((m._meta.label_lower, str(m._meta.verbose_name).capitalize()) for m in models),
        key=lambda choice: choice[1],
    )


def _display(value: Any) -> str:
    if value is _MISSING or value is None:
        return "—"
    if isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


def audit_changes(before: Any, after: Any) -> list[Change]:
    """The fields that differ between `before` and `after` (a created or deleted row: all)."""
    if not isinstance(before, dict | None) or not isinstance(after, dict | None):
        return [Change("value", _display(before), _display(after))]
    before, after = before or {}, after or {}
    changes = []
    for field in [*before, *(key for key in after if key not in before)]:
        old, new = before.get(field, _MISSING), after.get(field, _MISSING)
        if old == new:
            continue
        if any(hint in field.lower() for hint in SECRET_HINTS):
            old, new = ("(hidden)" if v is not _MISSING else v for v in (old, new))
        changes.append(Change(field, _display(old), _display(new)))
    return changes


def audit_entries(
    *, org_id: int, time_zone: str, filters: AuditFilters, cursor: Cursor | None, limit: int
) -> tuple[list[AuditLog], Cursor | None]:
    """One page of the org's audit entries, newest first, and the cursor of the next page."""
    entries: QuerySet[AuditLog] = AuditLog.objects.filter(org_id=org_id)
    if filters.action:
        entries = entries.filter(action__startswith=filters.action)
    if filters.actor == "system":
        entries = entries.filter(actor__isnull=True)
    elif filters.actor.isdigit():
        entries = entries.filter(actor_id=int(filters.actor))
    if filters.target_type:
        entries = entries.filter(target_type=filters.target_type)
    zone = ZoneInfo(time_zone)
    if filters.since:
        entries = entries.filter(created_at__gte=datetime.combine(filters.since, time(), zone))
    if filters.until:
        day_after = datetime.combine(filters.until + timedelta(days=1), time(), zone)
        entries = entries.filter(created_at__lt=day_after)
    if cursor is not None:
        at = cursor.created_at
        entries = entries.filter(Q(created_at__lt=at) | Q(created_at=at, pk__lt=cursor.pk))
    page = list(entries.select_related("actor").order_by("-created_at", "-pk")[: limit + 1])
    more = len(page) > limit
    page = page[:limit]
    return page, Cursor.after(page[-1]) if more and page else None


def _date(text: str, errors: list[str], label: str) -> date | None:
    if not text:
        return None
    try:
        return date.fromisoformat(text)
    except ValueError:
        errors.append(f"{label}: give a date as YYYY-MM-DD.")
        return None


@org_page(FINANCE_ROLES, refusal="The audit log is for owners, admins and finance.")
def audit_log(request: HttpRequest, viewer: Viewer) -> HttpResponse:
    """Who changed what and when, filterable, newest first, 50 to a page."""
    query, errors = request.GET, []
    filters = AuditFilters(
        action=query.get("action", "").strip(),
        actor=query.get("actor", ""),
        target_type=query.get("target_type", ""),
        since=_date(query.get("since", ""), errors, "From"),
        until=_date(query.get("until", ""), errors, "To"),
    )
    cursor = Cursor.parse(query.get("cursor", ""))
    entries, next_cursor = audit_entries(
        org_id=viewer.org.pk,
        time_zone=viewer.org.time_zone,
        filters=filters,
        cursor=cursor,
        limit=PAGE_SIZE,
    )
    active = {
        "action": filters.action,
        "actor": filters.actor,
        "target_type": filters.target_type,
        "since": query.get("since", "") if filters.since else "",
        "until": query.get("until", "") if filters.until else "",
    }
    actors = (
        Membership.objects.filter(org=viewer.org)
        .select_related("user")
        .order_by("user__username")
        .values_list("user_id", "user__username")
    )
    context = {
        "rows": [
            {"entry": entry, "changes": audit_changes(entry.before, entry.after)}
            for entry in entries
        ],
        "filters": active,
        "errors": errors,
        "actors": [(str(pk), username) for pk, username in actors],
        "target_types": target_type_choices(),
        "known_actions": KNOWN_ACTIONS,
        "first_page": cursor is None,
        "newest_url": viewer.url("dashboard:audit", **active),
        "older_url": viewer.url("dashboard:audit", **active, cursor=str(next_cursor))
        if next_cursor
        else None,
    }
    return render_page(request, viewer, "dashboard/audit.html", context)


urlpatterns = [
    path("audit/", audit_log, name="audit"),
]
