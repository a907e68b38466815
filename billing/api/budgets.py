"""Budgets: list, create, read, change and delete (admins and finance change; everyone reads).

Every budget comes with its standing in the current period, read from the counters the
proxy enforces (see `billing.budget_standing.budget_standings_read`).
"""

from collections.abc import Iterable
from decimal import Decimal
from typing import Any

import django_filters
from django.db import transaction
from django.db.models import QuerySet
from django.utils import timezone
from drf_spectacular.utils import extend_schema, extend_schema_field
from rest_framework import serializers, status
from rest_framework.request import Request
from rest_framework.response import Response

from billing.api.fields import UsdField
from billing.budget_counters import MAX_NANOS
from billing.budget_standing import BudgetStanding, budget_standings_read
from billing.pricing import NANOS_PER_USD
from tenants.api.base import ADMIN_AND_FINANCE, IF_MATCH, ManagementAPIView
from tenants.api.fields import MAX_ID, IdFilter
from tenants.models import Budget, Organization, Team, VirtualKey
from tenants.services import budget_create, budget_delete, budget_update

DEFAULT_THRESHOLDS = [50, 80, 100]
# What a budget limits is fixed once it exists: counters and alerts already belong to it.
_FIXED_TARGET = ("scope", "team", "key")


# ------------------------------------------------------------------ output


class BudgetForecastSerializer(serializers.Serializer[Any]):
    projected_nanos = serializers.IntegerField(
        allow_null=True,
        help_text="Spend at the end of the period at the current burn rate; null for a "
        "lifetime budget.",
    )
    exhausted_at = serializers.DateTimeField(
        allow_null=True,
        help_text="When the limit will be reached at that rate; null if not before the "
        "period ends (or, for a lifetime budget, not within a century).",
    )


class BudgetStandingSerializer(serializers.Serializer[BudgetStanding]):
    spent_nanos = serializers.SerializerMethodField(
        help_text="Settled spend this period (requests that finished)."
    )
    spent_usd = serializers.SerializerMethodField()
    reserved_nanos = serializers.IntegerField(
        help_text="Held by requests in flight (0 without Redis: the web process cannot see "
        "the proxy's in-process counters)."
    )
    remaining_nanos = serializers.IntegerField(help_text="Limit minus spent and reserved, >= 0.")
    remaining_usd = UsdField(source="remaining_nanos")
    period_start = serializers.DateTimeField()
    period_end = serializers.DateTimeField(
        allow_null=True, help_text="When the period resets; null for a lifetime budget."
    )
    forecast = serializers.SerializerMethodField()

    @extend_schema_field(serializers.IntegerField())
    def get_spent_nanos(self, standing: BudgetStanding) -> int:
        return standing.settled_nanos or 0

    @extend_schema_field(UsdField())
    def get_spent_usd(self, standing: BudgetStanding) -> str:
        return UsdField().to_representation(standing.settled_nanos or 0)

    @extend_schema_field(BudgetForecastSerializer)
    def get_forecast(self, standing: BudgetStanding) -> dict[str, Any]:
        forecast = standing.forecast(self.context["at"])
        return dict(BudgetForecastSerializer(forecast).data)


class BudgetSerializer(serializers.ModelSerializer[Budget]):
    """A budget with its standing; `context` holds `standings` (by id) and `at`."""

    limit_usd = UsdField(source="limit_nanos")
    soft_thresholds = serializers.ListField(
        child=serializers.IntegerField(),
        help_text="Percentages of the limit that send an alert once per period.",
    )
    standing = serializers.SerializerMethodField()

    class Meta:
        model = Budget
        fields = [
            "id", "scope", "team", "key", "period", "enforcement", "limit_nanos", "limit_usd",
            "soft_thresholds", "created_at", "updated_at", "standing",
        ]  # fmt: skip
        read_only_fields = fields

    @extend_schema_field(BudgetStandingSerializer)
    def get_standing(self, budget: Budget) -> dict[str, Any]:
        standing = self.context["standings"][budget.pk]
        return dict(BudgetStandingSerializer(standing, context=self.context).data)


def _standings(budgets: Iterable[Budget], org: Organization) -> dict[str, Any]:
    """Serializer context for `budgets`: their standings now (one counter read)."""
    at = timezone.now()
    by_id = {budget.pk: budget for budget in budgets}
    return {"standings": budget_standings_read(budgets=by_id, at=at, org_id=org.pk), "at": at}


def _budget_response(budget: Budget, org: Organization, status_code: int = 200) -> Response:
    context = _standings([budget], org)
    return Response(BudgetSerializer(budget, context=context).data, status=status_code)


# ------------------------------------------------------------------ input


class _TargetField(serializers.PrimaryKeyRelatedField):  # type: ignore[type-arg]
    """An id of one of the caller's org's teams or keys; another org's id is "not found"."""

    def __init__(self, noun: str, queryset: QuerySet[Any], **kwargs: Any) -> None:
        super().__init__(
            queryset=queryset,
            required=False,
            allow_null=True,
            pk_field=serializers.IntegerField(min_value=1, max_value=MAX_ID),
            error_messages={"does_not_exist": f"No {noun} with id {{pk_value}} in this "
                            "organization."},
            **kwargs,
        )  # fmt: skip


class _BudgetSettingsSerializer(serializers.Serializer[Any]):
    """Period, limit (in dollars or nano-USD), enforcement and alert thresholds."""

    period = serializers.ChoiceField(choices=Budget.Period.choices)
    limit_usd = serializers.DecimalField(
        max_digits=18, decimal_places=9, min_value=Decimal("0.000000001"),
        max_value=Decimal(MAX_NANOS - 1) / NANOS_PER_USD, required=False,
        help_text="The limit in US dollars, at most 9 decimal places. Give this or limit_nanos.",
    )  # fmt: skip
    limit_nanos = serializers.IntegerField(
        min_value=1, max_value=MAX_NANOS - 1, required=False,
        help_text="The limit in nano-USD (10^-9 dollars). Give this or limit_usd.",
    )  # fmt: skip
    enforcement = serializers.ChoiceField(
        choices=Budget.Enforcement.choices,
        help_text="hard: requests are refused at the limit; soft: alerts only.",
    )
    soft_thresholds = serializers.ListField(
        child=serializers.IntegerField(min_value=1, max_value=100),
        max_length=100,
        help_text="Whole percentages of the limit (1 to 100) that alert once per period.",
    )

    def validate(self, data: dict[str, Any]) -> dict[str, Any]:
        if "limit_usd" in data and "limit_nanos" in data:
            raise serializers.ValidationError(
                {"limit_usd": "Give the limit once: limit_usd or limit_nanos, not both."}
            )
        if "limit_usd" in data:
            data["limit_nanos"] = int(data.pop("limit_usd") * NANOS_PER_USD)  # exact: 9 places
        if "soft_thresholds" in data:
            data["soft_thresholds"] = sorted(set(data["soft_thresholds"]))
        return data


class BudgetCreateSerializer(_BudgetSettingsSerializer):
    scope = serializers.ChoiceField(choices=Budget.Scope.choices)
    team = _TargetField("team", Team.objects.none(), help_text="The team's id, for a team budget.")
    key = _TargetField(
        "key",
        VirtualKey.objects.none(),
        help_text="The key's id, for a key budget (not a revoked key).",
    )
    period = serializers.ChoiceField(choices=Budget.Period.choices, default=Budget.Period.MONTHLY)
    enforcement = serializers.ChoiceField(
        choices=Budget.Enforcement.choices, default=Budget.Enforcement.HARD,
        help_text="hard: requests are refused at the limit; soft: alerts only.",
    )  # fmt: skip
    soft_thresholds = serializers.ListField(
        child=serializers.IntegerField(min_value=1, max_value=100), max_length=100,
        default=DEFAULT_THRESHOLDS,
        help_text="Whole percentages of the limit (1 to 100) that alert once per period.",
    )  # fmt: skip

    def __init__(self, *args: Any, org: Organization | None = None, **kwargs: Any) -> None:
        """Teams and keys are looked up in `org` only (without it, none is found)."""
        super().__init__(*args, **kwargs)
        if org is not None:
            self.fields["team"].queryset = Team.objects.filter(org=org)  # type: ignore[attr-defined]
            keys = VirtualKey.objects.for_org(org).filter(revoked_at__isnull=True)
            self.fields["key"].queryset = keys  # type: ignore[attr-defined]

    def validate(self, data: dict[str, Any]) -> dict[str, Any]:
        data = super().validate(data)
        if "limit_nanos" not in data:
            raise serializers.ValidationError({"limit_usd": "Give the limit: limit_usd or "
                                               "limit_nanos."})  # fmt: skip
        scope = data["scope"]
        for target in ("team", "key"):
            given = data.get(target) is not None
            if scope == target and not given:
                raise serializers.ValidationError(
                    {target: f"A {target} budget names its {target}."}
                )
            if scope != target and given:
                raise serializers.ValidationError(
                    {target: f"Only a {target} budget names a {target}; this is a {scope} budget."}
                )
        return data


class BudgetUpdateSerializer(_BudgetSettingsSerializer):
    """PATCH: only the fields sent change; what the budget limits never does."""

    period = serializers.ChoiceField(choices=Budget.Period.choices, required=False)
    enforcement = serializers.ChoiceField(
        choices=Budget.Enforcement.choices, required=False,
        help_text="hard: requests are refused at the limit; soft: alerts only.",
    )  # fmt: skip
    soft_thresholds = serializers.ListField(
        child=serializers.IntegerField(min_value=1, max_value=100), max_length=100,
        required=False,
        help_text="Whole percentages of the limit (1 to 100) that alert once per period.",
    )  # fmt: skip

    def validate(self, data: dict[str, Any]) -> dict[str, Any]:
        sent = self.initial_data if isinstance(self.initial_data, dict) else {}
        for name in _FIXED_TARGET:
            if name in sent:
                raise serializers.ValidationError(
                    {name: "What a budget limits is fixed; delete it and create another."}
                )
        return super().validate(data)


# ------------------------------------------------------------------ views


class BudgetFilter(django_filters.FilterSet):
    scope = django_filters.ChoiceFilter(choices=Budget.Scope.choices)
    team = IdFilter(field_name="team_id")
    key = IdFilter(field_name="key_id")

    class Meta:
        model = Budget
        fields = ["scope", "team", "key", "period", "enforcement"]


class BudgetListView(ManagementAPIView):
    queryset = Budget.objects.select_related("org")
    serializer_class = BudgetSerializer
    write_roles = ADMIN_AND_FINANCE
    filterset_class = BudgetFilter
    ordering_fields = ["id", "created_at", "limit_nanos"]
    ordering = ["scope", "id"]

    @extend_schema(
        summary="List budgets with their standings", responses=BudgetSerializer(many=True)
    )
    def get(self, request: Request) -> Response:
        page = self.paginate_queryset(self.filter_queryset(self.get_queryset()))
        context = _standings(page, self.caller.org)
        # A budget deleted since the page was read has no standing: left out, as on screen.
        shown = [budget for budget in page if budget.pk in context["standings"]]
        return self.get_paginated_response(BudgetSerializer(shown, many=True, context=context).data)

    @extend_schema(
        summary="Create a budget on the org, a team or a key",
        request=BudgetCreateSerializer,
        responses={201: BudgetSerializer},
    )
    def post(self, request: Request) -> Response:
        given = BudgetCreateSerializer(data=request.data, org=self.caller.org)
        given.is_valid(raise_exception=True)
        budget = budget_create(org=self.caller.org, actor=self.caller.actor, **given.validated_data)
        return self.with_etag(_budget_response(budget, self.caller.org, 201), budget)


class BudgetDetailView(ManagementAPIView):
    queryset = Budget.objects.select_related("org")
    serializer_class = BudgetSerializer
    write_roles = ADMIN_AND_FINANCE

    @extend_schema(summary="Read a budget and its standing")
    def get(self, request: Request, pk: int) -> Response:
        budget = self.get_object()
        return self.with_etag(_budget_response(budget, self.caller.org), budget)

    @extend_schema(
        summary="Change a budget's period, limit, enforcement or alert thresholds",
        parameters=[IF_MATCH],
        request=BudgetUpdateSerializer,
        responses=BudgetSerializer,
    )
    def patch(self, request: Request, pk: int) -> Response:
        given = BudgetUpdateSerializer(data=request.data)
        given.is_valid(raise_exception=True)
        with transaction.atomic():
            budget = self.locked_object()
            changes = {
                "period": budget.period, "limit_nanos": budget.limit_nanos,
                "enforcement": budget.enforcement, "soft_thresholds": budget.soft_thresholds,
                **given.validated_data,
            }  # fmt: skip
            budget = budget_update(budget=budget, actor=self.caller.actor, **changes)
        # Read after the commit: standings hand their database connection back.
        return self.with_etag(_budget_response(budget, self.caller.org), budget)

    @extend_schema(summary="Delete a budget", parameters=[IF_MATCH], responses={204: None})
    def delete(self, request: Request, pk: int) -> Response:
        with transaction.atomic():
            budget_delete(budget=self.locked_object(), actor=self.caller.actor)
        return Response(status=status.HTTP_204_NO_CONTENT)
