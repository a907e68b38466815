"""Monthly statements: the closed ones (frozen), and a preview of an open month.

See billing/statements.py for how a month closes; amounts are exact nano-USD, with cents
(rounded once per line and once for the total) beside them.
"""

from datetime import date, datetime
from typing import Any
from zoneinfo import ZoneInfo

from django.utils import timezone
from drf_spectacular.utils import extend_schema
from rest_framework import exceptions, serializers
from rest_framework.request import Request
from rest_framework.response import Response

from billing.api.fields import CentsField, MonthField, UsdField
from billing.models import Statement
from billing.statements import (
    LineView,
    StatementView,
    statement_first_open_month,
    statement_open_view,
    statement_view,
)
from tenants.api.base import Conflict, ManagementAPIView
from tenants.models import Organization

FIRST_MONTH, LAST_MONTH = date(2000, 1, 1), date(2100, 12, 1)


class StatementSerializer(serializers.ModelSerializer[Statement]):
    month = MonthField()
    total_usd = UsdField(source="total_nanos")
    total_cents = CentsField(source="total_nanos")

    class Meta:
        model = Statement
        fields = [
            "id", "month", "time_zone", "period_start", "period_end", "closed_at",
            "total_nanos", "total_usd", "total_cents",
        ]  # fmt: skip
        read_only_fields = fields


class StatementLineSerializer(serializers.Serializer[LineView]):
    kind = serializers.CharField(
        help_text="usage: the month's own; adjustment: late usage of an earlier, closed month."
    )
    usage_month = MonthField()
    team_id = serializers.IntegerField(allow_null=True, help_text="Null: usage without a team.")
    team_name = serializers.CharField(help_text="As it was when the statement closed.")
    provider = serializers.CharField(source="provider_kind")
    model = serializers.CharField()
    requests = serializers.IntegerField()
    input_tokens = serializers.IntegerField()
    cached_input_tokens = serializers.IntegerField()
    output_tokens = serializers.IntegerField()
    reasoning_tokens = serializers.IntegerField()
    unpriced_requests = serializers.IntegerField()
    cost_nanos = serializers.IntegerField(source="amount_nanos")
    cost_usd = UsdField(source="amount_nanos")
    cost_cents = CentsField(source="amount_nanos")


class StatementDetailSerializer(serializers.Serializer[StatementView]):
    id = serializers.IntegerField(allow_null=True, help_text="Null for an open month's preview.")
    month = MonthField()
    closed = serializers.BooleanField(source="is_closed")
    time_zone = serializers.CharField(help_text="The calendar the month follows.")
    period_start = serializers.DateTimeField()
    period_end = serializers.DateTimeField()
    closed_at = serializers.DateTimeField(allow_null=True)
    total_nanos = serializers.IntegerField()
    total_usd = UsdField(source="total_nanos")
    total_cents = CentsField(source="total_nanos")
    usage_nanos = serializers.IntegerField(help_text="The month's own usage.")
    adjustment_nanos = serializers.IntegerField(help_text="Late usage of earlier months.")
    rounding_cents = serializers.IntegerField(
        help_text="The rounded total minus the sum of the rounded lines."
    )
    unpriced_requests = serializers.IntegerField()
    lines = StatementLineSerializer(many=True)

    def to_representation(self, instance: StatementView) -> dict[str, Any]:
        return {**super().to_representation(instance), "id": self.context.get("statement_id")}


class StatementPreviewQuery(serializers.Serializer[Any]):
    month = serializers.RegexField(
        r"^(20\d\d|2100)-(0[1-9]|1[0-2])$",
        required=False,
        help_text="YYYY-MM. Default: this month in the organization's time zone.",
    )

    def validate_month(self, raw: str) -> date:
        try:
            month = datetime.strptime(raw, "%Y-%m").date()
        except ValueError:
            raise serializers.ValidationError("Give a month as YYYY-MM.") from None
        if not FIRST_MONTH <= month <= LAST_MONTH:
            raise serializers.ValidationError(f"Give a month from {FIRST_MONTH:%Y-%m} to "
                                              f"{LAST_MONTH:%Y-%m}.")  # fmt: skip
        return month


def _current_month(org: Organization) -> date:
    return timezone.now().astimezone(ZoneInfo(org.time_zone)).date().replace(day=1)


class StatementListView(ManagementAPIView):
    queryset = Statement.objects.all()
    serializer_class = StatementSerializer
    filter_backends: list[Any] = []

    @extend_schema(
        summary="List closed statements, newest first", responses=StatementSerializer(many=True)
    )
    def get(self, request: Request) -> Response:
        page = self.paginate_queryset(self.get_queryset().order_by("-month"))
        return self.get_paginated_response(StatementSerializer(page, many=True).data)


class StatementDetailView(ManagementAPIView):
    queryset = Statement.objects.all()
    serializer_class = StatementDetailSerializer

    @extend_schema(summary="Read a closed statement and its lines")
    def get(self, request: Request, pk: int) -> Response:
        statement = self.get_object()
        view = statement_view(org=self.caller.org, month=statement.month)
        data = StatementDetailSerializer(view, context={"statement_id": statement.pk}).data
        return self.with_etag(Response(data), statement)


class StatementPreviewView(ManagementAPIView):
    filter_backends: list[Any] = []
    pagination_class = None

    @extend_schema(
        summary="Preview an open month's statement as it would close now",
        parameters=[StatementPreviewQuery],
        responses=StatementDetailSerializer,
    )
    def get(self, request: Request) -> Response:
        given = StatementPreviewQuery(data=request.query_params)
        given.is_valid(raise_exception=True)
        org = self.caller.org
        month = given.validated_data.get("month") or _current_month(org)
        closed = Statement.objects.filter(org=org, month=month).first()
        if closed is not None:
            raise Conflict(
                f"{month:%B %Y} is closed: read its statement at /api/v1/statements/{closed.pk}/."
            )
        first_open = statement_first_open_month(org=org)
        if not first_open <= month <= _current_month(org):
            raise exceptions.NotFound(
                f"No statement will cover {month:%B %Y}: open months run from "
                f"{first_open:%Y-%m} to this month."
            )
        view = statement_open_view(org=org, month=month, first_open=first_open)
        return Response(StatementDetailSerializer(view).data)
