"""Virtual keys: list, issue, view, edit, rotate and revoke.

Owners and admins manage every key of the org. Members see and manage only their
own team's keys (other keys are a 404), and may not change a key's limits. Finance
reads every key and changes none. A new or rotated secret is shown once: it is
stashed in the session by the POST and popped by the page the POST redirects to,
so a reload or the back button finds it gone.
"""

import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

from django import forms
from django.contrib import messages
from django.core.exceptions import PermissionDenied, ValidationError
from django.core.paginator import Paginator
from django.db.models import Q, QuerySet, Sum
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect
from django.urls import path
from django.utils import timezone
from django.views.decorators.http import require_POST

from billing.models import RollupMeasures, UsageRollup
from billing.rollups import day_floor, hour_floor
from dashboard.access import ALL_ROLES, Viewer, org_page, render_page
from dashboard.budgets import (
    budget_rows,
    usd_to_nanos,
)
from dashboard.forms import DashboardForm, TeamChoiceField, actor_of
from tenants.ip_allowlist import ip_allowlist_normalise
from tenants.models import Budget, Team, VirtualKey
from tenants.services import (
    IssuedKey,
    virtual_key_issue,
    virtual_key_revoke,
    virtual_key_rotate,
    virtual_key_update,
)

PAGE_SIZE = 50
RECENT_DAYS = 14
_SECRET_SESSION = "dashboard_key_secret"
STATUSES = {"active": "Active", "revoked": "Revoked", "expired": "Expired"}
Granularity = RollupMeasures.Granularity


# ------------------------------------------------------------------ who sees what


def keys_visible(viewer: Viewer) -> QuerySet[VirtualKey]:
    """The keys the viewer may see: the org's, or a member's own team's (none without one)."""
    keys = VirtualKey.objects.filter(org=viewer.org)
    if viewer.is_member:
        return keys.filter(team_id=viewer.team_id) if viewer.team_id else keys.none()
    return keys


def _key_or_404(viewer: Viewer, pk: int) -> VirtualKey:
    return get_object_or_404(keys_visible(viewer).select_related("org", "team"), pk=pk)


def _may_issue(viewer: Viewer) -> bool:
    return viewer.is_admin or (viewer.is_member and viewer.team_id is not None)


def _require(allowed: bool, why: str) -> None:
    if not allowed:
        raise PermissionDenied(why)


def key_status(key: VirtualKey, now: datetime) -> str:
    """ "active", "revoked" or "expired"."""
    if key.revoked_at is not None:
        return "revoked"
    if key.expires_at is not None and key.expires_at <= now:
        return "expired"
    return "active"


def _with_status(keys: QuerySet[VirtualKey], status: str, now: datetime) -> QuerySet[VirtualKey]:
    live = Q(revoked_at__isnull=True)
    if status == "active":
        return keys.filter(live & (Q(expires_at__isnull=True) | Q(expires_at__gt=now)))
    if status == "revoked":
        return keys.filter(revoked_at__isnull=False)
    if status == "expired":
        return keys.filter(live & Q(expires_at__lte=now))
    return keys


# ------------------------------------------------------------------ spend from rollups


def _month_start(zone: ZoneInfo, now: datetime) -> datetime:
    local = now.astimezone(zone)
    return local.replace(day=1, hour=0, minute=0, second=0, microsecond=0)


def month_spend_by_key(
    *, org_id: int, key_ids: list[int], now: datetime, zone: ZoneInfo
) -> dict[int, int]:
    """Each key's spend (nano-USD) since the month began in the org's time zone, from the
    rollups (one query): whole UTC days from the day rows, the hours before the first
    whole day (zones ahead of or behind UTC) from the hour rows."""
    since = hour_floor(_month_start(zone, now))
    first_day = day_floor(since)
    if first_day != since:
        first_day += timedelta(days=1)
    rows = (
        UsageRollup.objects.filter(org_id=org_id, key_id__in=key_ids)
        .filter(
            Q(granularity=Granularity.DAY, bucket_start__gte=first_day)
            | Q(granularity=Granularity.HOUR, bucket_start__gte=since, bucket_start__lt=first_day)
        )
        .order_by()
        .values("key_id")
        .annotate(cost=Sum("cost_nanos"))
    )
    return {row["key_id"]: int(row["cost"] or 0) for row in rows}


@dataclass(frozen=True, slots=True)
class DayUsage:
    day: datetime
    requests: int
    errors: int
    input_tokens: int
    output_tokens: int
    cost_nanos: int


def recent_usage(*, key: VirtualKey, now: datetime) -> list[DayUsage]:
    """The key's usage per UTC day over the last RECENT_DAYS days, newest first (rollups)."""
    rows = (
        UsageRollup.objects.filter(
            org_id=key.org_id,
            key_id=key.pk,
            granularity=Granularity.DAY,
            bucket_start__gte=day_floor(now) - timedelta(days=RECENT_DAYS - 1),
        )
        .order_by("-bucket_start")
        .values("bucket_start")
        .annotate(
            requests_sum=Sum("requests"),
            successes_sum=Sum("successes"),
            input_sum=Sum("input_tokens"),
            output_sum=Sum("output_tokens"),
            cost_sum=Sum("cost_nanos"),
        )
    )
    return [
        DayUsage(
            day=row["bucket_start"],
            requests=row["requests_sum"],
            errors=row["requests_sum"] - row["successes_sum"],
            input_tokens=row["input_sum"],
            output_tokens=row["output_sum"],
            cost_nanos=int(row["cost_sum"]),
        )
        for row in rows
    ]


# ------------------------------------------------------------------ forms

_MODEL_SEPARATORS = re.compile(r"[,\n]")
_IP_SEPARATORS = re.compile(r"[,\s]+")


def parse_models(text: str) -> list[str]:
    """Model names separated by commas or new lines; empty means every model."""
    return sorted({name.strip() for name in _MODEL_SEPARATORS.split(text) if name.strip()})


class _ExpiryInput(forms.DateTimeInput):
    input_type = "datetime-local"

    def __init__(self) -> None:
        super().__init__(format="%Y-%m-%dT%H:%M")


class KeySettingsForm(DashboardForm):
    """What an admin may change on a key (also the base of the create form)."""

    name = forms.CharField(label="Name", max_length=200)
    allowed_models = forms.CharField(
        label="Allowed models",
        required=False,
        widget=forms.Textarea(attrs={"rows": 3}),
        help_text="Public model names, separated by commas or new lines. Empty: every model.",
    )
    allowed_ips = forms.CharField(
        label="Allowed IP addresses",
        required=False,
        widget=forms.Textarea(attrs={"rows": 2}),
        help_text="Addresses or networks (CIDR, IPv4 or IPv6, e.g. 203.0.113.0/24), separated "
        "by commas or new lines. Requests from elsewhere get 403. Empty: any address.",
    )
    rpm_limit = forms.IntegerField(
        label="RPM limit",
        required=False,
        min_value=1,
        help_text="Requests per minute. Empty: none.",
    )
    tpm_limit = forms.IntegerField(
        label="TPM limit", required=False, min_value=1, help_text="Tokens per minute. Empty: none."
    )
    expires_at = forms.DateTimeField(
        label="Expires",
        required=False,
        widget=_ExpiryInput(),
        help_text="Optional, in the organization's time zone.",
    )

    def clean_name(self) -> str:
        name = " ".join(self.cleaned_data["name"].split())
        if not name:
            raise ValidationError("Give the key a name.")
        return name

    def clean_allowed_models(self) -> list[str]:
        return parse_models(self.cleaned_data["allowed_models"])

    def clean_allowed_ips(self) -> list[str]:
        entries = [
            entry for entry in _IP_SEPARATORS.split(self.cleaned_data["allowed_ips"]) if entry
        ]
        try:
            return ip_allowlist_normalise(entries)
        except ValueError as exc:
            raise ValidationError(str(exc)) from None

    def clean_expires_at(self) -> datetime | None:
        expires_at: datetime | None = self.cleaned_data["expires_at"]
        if expires_at is not None and expires_at <= timezone.now():
            raise ValidationError("Pick a time in the future, or leave it empty.")
        return expires_at


class KeyCreateForm(KeySettingsForm):
    team = TeamChoiceField(label="Team", queryset=Team.objects.none(), required=False)
    monthly_budget_usd = forms.DecimalField(
        label="Monthly budget (USD)",
        required=False,
        min_value=Decimal("0.000000001"),
        max_digits=18,
        decimal_places=9,
        help_text="Optional: a hard monthly limit on this key's spend.",
    )
    field_order = ["name", "team"]

    def __init__(self, *args: Any, viewer: Viewer, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        team = self.fields["team"]
        if viewer.is_member:
            # A member's keys belong to their team: the choice is made for them.
            team.queryset = Team.objects.filter(pk=viewer.team_id)
            team.required, team.empty_label, team.disabled = True, None, True
            team.initial = viewer.team_id
        else:
            team.queryset = Team.objects.filter(org=viewer.org).order_by("name")
            team.empty_label = "No team"


# ------------------------------------------------------------------ pages


@org_page(ALL_ROLES)
def keys_list(request: HttpRequest, viewer: Viewer) -> HttpResponse:
    now = timezone.now()
    status = request.GET.get("status", "")
    status = status if status in STATUSES else ""
    teams = [] if viewer.is_member else list(Team.objects.filter(org=viewer.org).order_by("name"))
    team_id = request.GET.get("team", "")
    team_id = team_id if any(str(team.pk) == team_id for team in teams) else ""
    keys = _with_status(keys_visible(viewer), status, now).select_related("team")
    if team_id:
        keys = keys.filter(team_id=team_id)
    page = Paginator(keys.order_by("-created_at", "-pk"), PAGE_SIZE).get_page(
        request.GET.get("page")
    )
    rows = list(page.object_list)
    spend = month_spend_by_key(
        org_id=viewer.org.pk,
        key_ids=[key.pk for key in rows],
        now=now,
        zone=ZoneInfo(viewer.org.time_zone),
    )
    context = {
        "rows": [
            {"key": key, "status": key_status(key, now), "spend_nanos": spend.get(key.pk, 0)}
            for key in rows
        ],
        "page": page,
        "statuses": STATUSES,
        "status": status,
        "teams": teams,
        "team_id": team_id,
        "filtered": bool(status or team_id),
        "may_issue": _may_issue(viewer),
        "no_team": viewer.is_member and viewer.team_id is None,
    }
    return render_page(request, viewer, "dashboard/keys.html", context)


def _stash_secret(request: HttpRequest, issued: IssuedKey) -> None:
    request.session[_SECRET_SESSION] = {"key_id": issued.key.pk, "plaintext": issued.plaintext}


def _pop_secret(request: HttpRequest, key: VirtualKey) -> str | None:
    """The secret stashed for this key by the POST just before, once; dropped otherwise."""
    stashed = request.session.pop(_SECRET_SESSION, None)
    if stashed and stashed.get("key_id") == key.pk:
        return str(stashed["plaintext"])
    return None


@org_page(ALL_ROLES)
def keys_new(request: HttpRequest, viewer: Viewer) -> HttpResponse:
    _require(_may_issue(viewer), "Only admins, and members of a team, may create keys.")
    with timezone.override(ZoneInfo(viewer.org.time_zone)):
        form = KeyCreateForm(request.POST or None, viewer=viewer)
        if request.method == "POST" and form.is_valid():
            data = form.cleaned_data
            budget = data["monthly_budget_usd"]
            issued = virtual_key_issue(
                org=viewer.org,
                name=data["name"],
                actor=actor_of(request),
                team=data["team"],
                owner=request.user,  # type: ignore[arg-type]
                allowed_models=data["allowed_models"],
                allowed_ips=data["allowed_ips"],
                expires_at=data["expires_at"],
                rpm_limit=data["rpm_limit"],
                tpm_limit=data["tpm_limit"],
                monthly_budget_nanos=None if budget is None else usd_to_nanos(budget),
            )
            _stash_secret(request, issued)
            messages.success(request, f"Key “{issued.key.name}” created.")
            return redirect(viewer.url("dashboard:keys_detail", issued.key.pk))
        return render_page(request, viewer, "dashboard/keys_new.html", {"form": form})


def _settings_form(key: VirtualKey, data: Any = None) -> KeySettingsForm:
    initial = {
        "name": key.name,
        "allowed_models": "\n".join(key.allowed_models),
        "allowed_ips": "\n".join(key.allowed_ips),
        "rpm_limit": key.rpm_limit,
        "tpm_limit": key.tpm_limit,
        "expires_at": key.expires_at,
    }
    return KeySettingsForm(data, initial=initial, auto_id="edit_%s")


def _detail(
    request: HttpRequest, viewer: Viewer, key: VirtualKey, *, form: KeySettingsForm | None = None,
    status: int = 200,
) -> HttpResponse:  # fmt: skip
    now = timezone.now()
    secret = _pop_secret(request, key)
    state = key_status(key, now)
    applying = Budget.objects.filter(org=viewer.org).filter(
        Q(scope=Budget.Scope.ORG) | Q(scope=Budget.Scope.KEY, key=key)
        | (Q(scope=Budget.Scope.TEAM, team_id=key.team_id) if key.team_id else Q(pk__in=[]))
    )  # fmt: skip
    with timezone.override(ZoneInfo(viewer.org.time_zone)):
        context = {
            "key": key,
            "status": state,
            "secret": secret,
            "base_url": request.build_absolute_uri("/v1"),
            "form": form
            or (_settings_form(key) if viewer.is_admin and state != "revoked" else None),
            "may_change": state != "revoked" and (viewer.is_admin or viewer.is_member),
            "budgets": budget_rows(applying, org=viewer.org, at=now),
            "usage": recent_usage(key=key, now=now),
            "recent_days": RECENT_DAYS,
        }
        response = render_page(
            request, viewer, "dashboard/keys_detail.html", context, status=status
        )
    # A page that may hold a secret is never stored, nor shown again from history.
    response["Cache-Control"] = "no-store"
    return response


@org_page(ALL_ROLES)
def keys_detail(request: HttpRequest, viewer: Viewer, pk: int) -> HttpResponse:
    return _detail(request, viewer, _key_or_404(viewer, pk))


@require_POST
@org_page(ALL_ROLES)
def keys_edit(request: HttpRequest, viewer: Viewer, pk: int) -> HttpResponse:
    key = _key_or_404(viewer, pk)
    _require(viewer.is_admin, "Only owners and admins may change a key's settings.")
    with timezone.override(ZoneInfo(viewer.org.time_zone)):
        form = _settings_form(key, request.POST)
        valid = form.is_valid()
    if not valid:
        return _detail(request, viewer, key, form=form, status=400)
    try:
        virtual_key_update(key=key, actor=actor_of(request), **form.cleaned_data)
    except ValidationError as exc:
        messages.error(request, " ".join(exc.messages))
    else:
        messages.success(request, "Key settings saved.")
    return redirect(viewer.url("dashboard:keys_detail", key.pk))


@require_POST
@org_page(ALL_ROLES)
def keys_rotate(request: HttpRequest, viewer: Viewer, pk: int) -> HttpResponse:
    key = _key_or_404(viewer, pk)
    _require(viewer.is_admin or viewer.is_member, "Finance may not rotate keys.")
    try:
        issued = virtual_key_rotate(key=key, actor=actor_of(request))
    except ValidationError as exc:
        messages.error(request, " ".join(exc.messages))
    else:
        _stash_secret(request, issued)
        messages.success(request, "Key rotated: the old secret no longer works.")
    return redirect(viewer.url("dashboard:keys_detail", key.pk))


@require_POST
@org_page(ALL_ROLES)
def keys_revoke(request: HttpRequest, viewer: Viewer, pk: int) -> HttpResponse:
    key = _key_or_404(viewer, pk)
    _require(viewer.is_admin or viewer.is_member, "Finance may not revoke keys.")
    virtual_key_revoke(key=key, actor=actor_of(request))
    messages.success(request, f"Key “{key.name}” revoked: it no longer works.")
    return redirect(viewer.url("dashboard:keys_detail", key.pk))


urlpatterns = [
    path("keys/", keys_list, name="keys"),
    path("keys/new/", keys_new, name="keys_new"),
    path("keys/<int:pk>/", keys_detail, name="keys_detail"),
    path("keys/<int:pk>/edit/", keys_edit, name="keys_edit"),
    path("keys/<int:pk>/rotate/", keys_rotate, name="keys_rotate"),
    path("keys/<int:pk>/revoke/", keys_revoke, name="keys_revoke"),
]
