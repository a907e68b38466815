"""Budgets: where each stands in its period (settled and reserved spend, forecast), and
their settings.

Standings come from the budget counters the proxy enforces, through
`billing.budget_standing.budget_standings_read`: Redis when it is configured, else a
fresh in-process copy seeded from the ledger (settled spend as ingested, nothing in
flight).

Owners and admins change budgets; finance reads them all; members read the org's,
their team's and their team's keys' budgets.
"""

import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from django import forms
from django.contrib import messages
from django.core.exceptions import PermissionDenied, ValidationError
from django.db.models import Q, QuerySet
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect
from django.urls import path
from django.utils import timezone
from django.views.decorators.http import require_POST

from billing.budget_counters import MAX_NANOS
from billing.budget_standing import BudgetForecast, BudgetStanding, budget_standings_read
from dashboard.access import ALL_ROLES, Viewer, org_page, render_page
from dashboard.forms import DashboardForm, TeamChoiceField, actor_of
from tenants.models import Budget, Organization, Team, VirtualKey
from tenants.selectors import budget_label
from tenants.services import budget_create, budget_delete, budget_update

NANOS_PER_USD = 10**9
DEFAULT_THRESHOLDS = "50, 80, 100"


def usd_to_nanos(amount: Decimal) -> int:
    """Dollars (at most 9 decimal places, validated by the form) as integer nano-USD."""
    return int(amount * NANOS_PER_USD)


# ------------------------------------------------------------------ standings


def _percent(part: int, whole: int) -> str:
    """`part` of `whole` as a CSS width with one decimal ("42.5"), capped at 100."""
    tenths = min(1000, part * 1000 // whole) if whole > 0 else 0
    return f"{tenths // 10}.{tenths % 10}"


@dataclass(frozen=True, slots=True)
class BudgetRow:
    """One budget as the pages show it: its settings, standing and forecast."""

    budget: Budget
    label: str
    standing: BudgetStanding
    forecast: BudgetForecast
    settled_nanos: int
    settled_pct: str
    reserved_pct: str
    used_pct: str

    @property
    def over(self) -> bool:
        return self.settled_nanos >= self.budget.limit_nanos

    @property
    def thresholds(self) -> str:
        return ", ".join(f"{value}%" for value in self.budget.soft_thresholds) or "none"


def budget_rows(
    budgets: Iterable[Budget] | QuerySet[Budget], *, org: Organization, at: datetime
) -> list[BudgetRow]:
    """The budgets with their standings at `at` (one counter read for the org)."""
    ordered = list(
        budgets.select_related("org", "team", "key").order_by("scope", "pk")
        if isinstance(budgets, QuerySet)
        else budgets
    )
    if not ordered:
        return []
    by_id = {budget.pk: budget for budget in ordered}
    standings = budget_standings_read(budgets=by_id, at=at, org_id=org.pk)
    rows = []
    for budget in ordered:
        standing = standings.get(budget.pk)
        if standing is None:  # deleted meanwhile
            continue
        settled = standing.settled_nanos or 0
        settled_pct = _percent(settled, budget.limit_nanos)
        reserved = min(standing.reserved_nanos, max(0, budget.limit_nanos - settled))
        rows.append(
            BudgetRow(
                budget=budget,
                label=budget_label(budget),
                standing=standing,
                forecast=standing.forecast(at),
                settled_nanos=settled,
                settled_pct=settled_pct,
                reserved_pct=_percent(reserved, budget.limit_nanos),
                used_pct=_percent(settled + standing.reserved_nanos, budget.limit_nanos),
            )
        )
    return rows


# ------------------------------------------------------------------ who sees what


def budgets_visible(viewer: Viewer) -> QuerySet[Budget]:
    """The org's budgets; for a member, the org's, their team's and their team's keys'."""
    budgets = Budget.objects.filter(org=viewer.org)
    if not viewer.is_member:
        return budgets
    mine = Q(scope=Budget.Scope.ORG)
    if viewer.team_id is not None:
        mine |= Q(scope=Budget.Scope.TEAM, team_id=viewer.team_id)
        mine |= Q(scope=Budget.Scope.KEY, key__team_id=viewer.team_id)
    return budgets.filter(mine)


def _require_admin(viewer: Viewer) -> None:
    if not viewer.is_admin:
        raise PermissionDenied("Only owners and admins may change budgets.")


# ------------------------------------------------------------------ forms


_THRESHOLD_SEPARATORS = re.compile(r"[,\s%]+")


class _KeyChoice(forms.ModelChoiceField):
    def label_from_instance(self, obj: Any) -> str:
        return f"{obj.name} ({obj.prefix}…)"


class BudgetForm(DashboardForm):
    """A budget's settings; a new budget also picks what it limits (fixed afterwards)."""

    scope = forms.ChoiceField(label="Scope", choices=Budget.Scope.choices)
    team = TeamChoiceField(
        label="Team", queryset=Team.objects.none(), required=False, help_text="For a team budget."
    )
    key = _KeyChoice(
        label="Key",
        queryset=VirtualKey.objects.none(),
        required=False,
        help_text="For a key budget.",
    )
    period = forms.ChoiceField(
        label="Period",
        choices=Budget.Period.choices,
        initial=Budget.Period.MONTHLY,
        help_text="Calendar periods in the organization's time zone; lifetime never resets.",
    )
    limit_usd = forms.DecimalField(
        label="Limit (USD)",
        min_value=Decimal("0.000000001"),
        max_value=Decimal(MAX_NANOS - 1) / NANOS_PER_USD,
        max_digits=18,
        decimal_places=9,
        help_text="Up to 9 decimal places.",
    )
    enforcement = forms.ChoiceField(
        label="Enforcement", choices=Budget.Enforcement.choices, initial=Budget.Enforcement.HARD
    )
    thresholds = forms.CharField(
        label="Alert thresholds",
        required=False,
        initial=DEFAULT_THRESHOLDS,
        help_text="Percentages of the limit that send an alert once per period, e.g. 50, 80, 100.",
    )

    def __init__(
        self, *args: Any, org: Organization, budget: Budget | None = None, **kwargs: Any
    ) -> None:
        if budget is not None:
            kwargs.setdefault("initial", {}).update(
                period=budget.period,
                limit_usd=(Decimal(budget.limit_nanos) / NANOS_PER_USD).normalize(),
                enforcement=budget.enforcement,
                thresholds=", ".join(str(value) for value in budget.soft_thresholds),
            )
        super().__init__(*args, **kwargs)
        if budget is not None:
            for name in ("scope", "team", "key"):
                del self.fields[name]  # a budget's target never changes
            return
        self.fields["team"].queryset = Team.objects.filter(org=org).order_by("name")  # type: ignore[attr-defined]
        self.fields["key"].queryset = (
            VirtualKey.objects.for_org(org)
            .filter(  # type: ignore[attr-defined]
                revoked_at__isnull=True
            )
            .order_by("name")
        )

    def clean_thresholds(self) -> list[int]:
        values = [
            part for part in _THRESHOLD_SEPARATORS.split(self.cleaned_data["thresholds"]) if part
        ]
        if not all(part.isdigit() and 1 <= int(part) <= 100 for part in values):
            raise ValidationError("Give whole percentages from 1 to 100, separated by commas.")
        return sorted({int(part) for part in values})

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        scope = data.get("scope")
        if scope == Budget.Scope.TEAM and not data.get("team"):
            self.add_error("team", "Pick the team this budget limits.")
        if scope == Budget.Scope.KEY and not data.get("key"):
            self.add_error("key", "Pick the key this budget limits.")
        # Only the target the scope names is kept.
        if "team" in self.fields and scope != Budget.Scope.TEAM:
            data["team"] = None
        if "key" in self.fields and scope != Budget.Scope.KEY:
            data["key"] = None
        return data

    def settings(self) -> dict[str, Any]:
        """The validated period, limit, enforcement and thresholds, as the services take them."""
        data = self.cleaned_data
        return {
            "period": data["period"],
            "limit_nanos": usd_to_nanos(data["limit_usd"]),
            "enforcement": data["enforcement"],
            "soft_thresholds": data["thresholds"],
        }


# ------------------------------------------------------------------ pages


@org_page(ALL_ROLES)
def budgets_list(request: HttpRequest, viewer: Viewer) -> HttpResponse:
    rows = budget_rows(budgets_visible(viewer), org=viewer.org, at=timezone.now())
    return render_page(request, viewer, "dashboard/budgets.html", {"rows": rows})


@org_page(ALL_ROLES)
def budgets_new(request: HttpRequest, viewer: Viewer) -> HttpResponse:
    _require_admin(viewer)
    form = BudgetForm(request.POST or None, org=viewer.org)
    if request.method == "POST" and form.is_valid():
        data = form.cleaned_data
        try:
            budget = budget_create(
                org=viewer.org,
                scope=data["scope"],
                team=data["team"],
                key=data["key"],
                actor=actor_of(request),
                **form.settings(),
            )
        except ValidationError as exc:
            form.add_error(None, exc)
        else:
            messages.success(request, f"{budget_label(budget)} created.")
            return redirect(viewer.url("dashboard:budgets_detail", budget.pk))
    status = 400 if form.errors else 200
    return render_page(request, viewer, "dashboard/budgets_new.html", {"form": form}, status=status)


def _budget_or_404(viewer: Viewer, pk: int) -> Budget:
    return get_object_or_404(budgets_visible(viewer).select_related("org", "team", "key"), pk=pk)


def _detail(
    request: HttpRequest, viewer: Viewer, budget: Budget, form: BudgetForm | None = None,
    status: int = 200,
) -> HttpResponse:  # fmt: skip
    if form is None and viewer.is_admin:
        form = BudgetForm(org=viewer.org, budget=budget)
    context = {"row": budget_rows([budget], org=viewer.org, at=timezone.now())[0], "form": form}
    return render_page(request, viewer, "dashboard/budgets_detail.html", context, status=status)


@org_page(ALL_ROLES)
def budgets_detail(request: HttpRequest, viewer: Viewer, pk: int) -> HttpResponse:
    return _detail(request, viewer, _budget_or_404(viewer, pk))


@require_POST
@org_page(ALL_ROLES)
def budgets_edit(request: HttpRequest, viewer: Viewer, pk: int) -> HttpResponse:
    budget = _budget_or_404(viewer, pk)
    _require_admin(viewer)
    form = BudgetForm(request.POST, org=viewer.org, budget=budget)
    if not form.is_valid():
        return _detail(request, viewer, budget, form, status=400)
    budget_update(budget=budget, actor=actor_of(request), **form.settings())
    messages.success(request, "Budget saved.")
    return redirect(viewer.url("dashboard:budgets_detail", budget.pk))


@require_POST
@org_page(ALL_ROLES)
def budgets_delete(request: HttpRequest, viewer: Viewer, pk: int) -> HttpResponse:
    budget = _budget_or_404(viewer, pk)
    _require_admin(viewer)
    label = budget_label(budget)
    budget_delete(budget=budget, actor=actor_of(request))
    messages.success(request, f"{label} deleted.")
    return redirect(viewer.url("dashboard:budgets"))


urlpatterns = [
    path("budgets/", budgets_list, name="budgets"),
    path("budgets/new/", budgets_new, name="budgets_new"),
    path("budgets/<int:pk>/", budgets_detail, name="budgets_detail"),
    path("budgets/<int:pk>/edit/", budgets_edit, name="budgets_edit"),
    path("budgets/<int:pk>/delete/", budgets_delete, name="budgets_delete"),
]
