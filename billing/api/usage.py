"""Usage and cost reports of the caller's org, read from the hourly and daily rollups.

Rollups hold whole UTC hours, so every window is rounded outward to whole hours (`since`
down, `until` up) and the response says which instants it covers. Responses are bounded
by the window and the org's own teams, keys and models, so they are not paginated.
"""

import dataclasses
from datetime import UTC, date, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from django.utils import timezone
from drf_spectacular.utils import extend_schema, extend_schema_field
from rest_framework import serializers
from rest_framework.request import Request
from rest_framework.response import Response

from billing.api.fields import UsdField
from billing.models import RollupMeasures
from billing.rollups import HOUR, day_floor, hour_floor
from billing.selectors import (
    BREAKDOWNS,
    EndUserUsage,
    UsageSummary,
    rollups_complete_until,
    usage_by_end_user,
    usage_report,
    usage_series,
)
from tenants.api.base import ManagementAPIView
from tenants.models import Organization

Granularity = RollupMeasures.Granularity
# Instants and days outside these are typos, and would overflow time zone arithmetic.
FIRST_AT, END_AT = datetime(2000, 1, 1, tzinfo=UTC), datetime(2101, 1, 1, tzinfo=UTC)
FIRST_DAY, LAST_DAY = date(2000, 1, 1), date(2100, 12, 31)
MAX_USAGE_SPAN = timedelta(days=400)
MAX_HOURLY_SPAN = timedelta(days=31)
MAX_REPORT_DAYS = 731  # two years, as on the dashboard's cost report
# Cost report groupings: the rollup breakdowns finance asks for, plus end users (raw events).
REPORT_GROUPS = ("team", "key", "model", "provider", "deployment", "tag", "end_user")
END_USER_ROWS = 1000


def _local_today(org: Organization) -> date:
    return timezone.now().astimezone(ZoneInfo(org.time_zone)).date()


def _month_start_before(until: datetime, time_zone: str) -> datetime:
    """The start of the calendar month (in `time_zone`) of the instant just before `until`."""
    zone = ZoneInfo(time_zone)
    day = (until - timedelta(microseconds=1)).astimezone(zone).date()
    return datetime.combine(day.replace(day=1), time(), zone)


def _hour_ceil(moment: datetime) -> datetime:
    floor = hour_floor(moment)
    return floor if floor == moment else floor + HOUR


# ------------------------------------------------------------------ query parameters


class UsageWindowQuery(serializers.Serializer[Any]):
    """`since`/`until` (ISO 8601); by default this calendar month (in the org's time zone)
    until now. Needs `org` in its context."""

    since = serializers.DateTimeField(
        required=False,
        help_text="Start (inclusive), rounded down to the hour. Default: the start of "
        "`until`'s calendar month in the organization's time zone.",
    )
    until = serializers.DateTimeField(
        required=False,
        help_text="End (exclusive), rounded up to the hour. Default: now.",
    )

    def validate(self, data: dict[str, Any]) -> dict[str, Any]:
        org: Organization = self.context["org"]
        for name in ("since", "until"):
            if name in data and not FIRST_AT <= data[name] < END_AT:
                raise serializers.ValidationError({name: "Give an instant in 2000 to 2100."})
        until = data.get("until") or timezone.now()
        since = data.get("since") or _month_start_before(until, org.time_zone)
        if since >= until:
            raise serializers.ValidationError({"until": "“until” must be after “since”."})
        max_span = self.max_span(data)
        if until - since > max_span:
            raise serializers.ValidationError(
                {"since": f"This window covers at most {max_span.days} days."}
            )
        return {**data, "since": hour_floor(since), "until": _hour_ceil(until)}

    def max_span(self, data: dict[str, Any]) -> timedelta:
        return MAX_USAGE_SPAN


class UsageBreakdownQuery(UsageWindowQuery):
    by = serializers.ChoiceField(choices=list(BREAKDOWNS), help_text="What to group by.")


class UsageSeriesQuery(UsageWindowQuery):
    granularity = serializers.ChoiceField(
        choices=Granularity.choices,
        default=Granularity.DAY,
        help_text="One point per UTC hour (windows of at most 31 days) or per UTC day.",
    )
    model = serializers.CharField(
        required=False, max_length=200, help_text="Only requests for this public model name."
    )

    def max_span(self, data: dict[str, Any]) -> timedelta:
        return MAX_HOURLY_SPAN if data["granularity"] == Granularity.HOUR else MAX_USAGE_SPAN

    def validate(self, data: dict[str, Any]) -> dict[str, Any]:
        data = super().validate(data)
        if data["granularity"] == Granularity.DAY:
            data["since"] = day_floor(data["since"])
        return data


class CostReportQuery(serializers.Serializer[Any]):
    """Whole days in the org's time zone, both inclusive; by default this month so far.
    Needs `org` in its context."""

    since = serializers.DateField(
        required=False, help_text="First day (inclusive). Default: the 1st of `until`'s month."
    )
    until = serializers.DateField(
        required=False, help_text="Last day (inclusive). Default: today (or `since`)."
    )
    by = serializers.ChoiceField(choices=list(REPORT_GROUPS), default="team")

    def validate(self, data: dict[str, Any]) -> dict[str, Any]:
        org: Organization = self.context["org"]
        for name in ("since", "until"):
            if name in data and not FIRST_DAY <= data[name] <= LAST_DAY:
                raise serializers.ValidationError(
                    {name: f"Give a day from {FIRST_DAY} to {LAST_DAY}."}
                )
        today = _local_today(org)
        last_day = data.get("until")
        first_day = data.get("since") or (last_day or today).replace(day=1)
        last_day = last_day or max(today, first_day)
        if last_day < first_day:
            raise serializers.ValidationError({"until": f"{last_day} is before {first_day}."})
        if (last_day - first_day).days + 1 > MAX_REPORT_DAYS:
            raise serializers.ValidationError(
                {"since": f"A report covers at most two years ({MAX_REPORT_DAYS} days)."}
            )
        zone = ZoneInfo(org.time_zone)
        return {
            "by": data["by"],
            "first_day": first_day,
            "last_day": last_day,
            # What the rollups cover: whole UTC hours, as the dashboard's report.
            "since": hour_floor(datetime.combine(first_day, time(), zone)),
            "until": hour_floor(datetime.combine(last_day + timedelta(days=1), time(), zone)),
        }


# ------------------------------------------------------------------ responses


class UsageFiguresSerializer(serializers.Serializer[UsageSummary]):
    requests = serializers.IntegerField()
    errors = serializers.IntegerField(help_text="Requests that did not succeed.")
    errors_by_class = serializers.DictField(
        child=serializers.IntegerField(), help_text="Failed requests per error class."
    )
    input_tokens = serializers.IntegerField()
    cached_input_tokens = serializers.IntegerField()
    output_tokens = serializers.IntegerField()
    reasoning_tokens = serializers.IntegerField()
    cost_nanos = serializers.IntegerField(help_text="Cost in nano-USD (10^-9 dollars).")
    cost_usd = UsdField(source="cost_nanos")
    unpriced_requests = serializers.IntegerField(
        help_text="Requests whose model had no price: counted, costing 0."
    )
    cache_hits = serializers.IntegerField()
    latency_mean_ms = serializers.FloatField(allow_null=True)
    latency_p50_ms = serializers.FloatField(allow_null=True)
    latency_p95_ms = serializers.FloatField(allow_null=True)
    latency_p99_ms = serializers.FloatField(allow_null=True)
    ttft_p50_ms = serializers.FloatField(allow_null=True, help_text="Time to first token.")
    ttft_p95_ms = serializers.FloatField(allow_null=True)
    ttft_p99_ms = serializers.FloatField(allow_null=True)


COMPLETE_UNTIL_HELP = (
    "The figures come from the hourly rollups, which hold every request that started "
    "before this instant; later requests are counted once rolled up (every minute or so). "
    "Null: nothing rolled up yet."
)


class _WindowSerializer(serializers.Serializer[Any]):
    since = serializers.DateTimeField(help_text="Start of the hours covered (inclusive).")
    until = serializers.DateTimeField(help_text="End of the hours covered (exclusive).")
    complete_until = serializers.DateTimeField(allow_null=True, help_text=COMPLETE_UNTIL_HELP)


class UsageSummarySerializer(_WindowSerializer, UsageFiguresSerializer):
    pass


class UsageGroupSerializer(UsageFiguresSerializer):
    key = serializers.SerializerMethodField()
    label = serializers.CharField()

    @extend_schema_field(
        serializers.CharField(
            allow_null=True,
            help_text="The group's id or value as text (a team, key or deployment id; a "
            "model, provider, endpoint or tag); null for requests without one.",
        )
    )
    def get_key(self, summary: UsageSummary) -> str | None:
        return None if summary.key is None else str(summary.key)


class UsageBreakdownSerializer(_WindowSerializer):
    by = serializers.CharField()
    groups = UsageGroupSerializer(many=True, help_text="Costliest first.")
    total = UsageFiguresSerializer(
        help_text="All requests (by tag, groups overlap and leave untagged requests out, so "
        "they do not add up to this)."
    )


class UsagePointSerializer(UsageFiguresSerializer):
    bucket_start = serializers.DateTimeField(source="key", help_text="The UTC hour or day.")


class UsageSeriesSerializer(_WindowSerializer):
    granularity = serializers.CharField()
    model = serializers.CharField(allow_null=True)
    points = UsagePointSerializer(
        many=True, help_text="Oldest first; hours or days without requests are left out."
    )


class CostReportRowSerializer(serializers.Serializer[Any]):
    key = serializers.CharField(allow_null=True, help_text="The group's id or value as text.")
    label = serializers.CharField()
    requests = serializers.IntegerField()
    errors = serializers.IntegerField()
    input_tokens = serializers.IntegerField()
    output_tokens = serializers.IntegerField()
    cost_nanos = serializers.IntegerField()
    cost_usd = UsdField(source="cost_nanos")
    unpriced_requests = serializers.IntegerField(
        allow_null=True, help_text="Null when not known for the grouping (end users)."
    )
    latency_p50_ms = serializers.FloatField(allow_null=True)
    latency_p95_ms = serializers.FloatField(allow_null=True)


class CostReportSerializer(serializers.Serializer[Any]):
    since = serializers.DateField(source="first_day", help_text="First day (inclusive).")
    until = serializers.DateField(source="last_day", help_text="Last day (inclusive).")
    covers_since = serializers.DateTimeField(
        help_text="The instants the figures cover: the days in the organization's time zone, "
        "rounded down to whole UTC hours."
    )
    covers_until = serializers.DateTimeField()
    complete_until = serializers.DateTimeField(allow_null=True, help_text=COMPLETE_UNTIL_HELP)
    by = serializers.CharField()
    rows = CostReportRowSerializer(many=True, help_text="Costliest first.")
    total = CostReportRowSerializer(help_text="All requests in the period.")
    truncated = serializers.BooleanField(
        help_text=f"By end user: only the {END_USER_ROWS} costliest are listed."
    )


def _report_row(summary: UsageSummary) -> dict[str, Any]:
    return {
        "key": None if summary.key is None else str(summary.key), "label": summary.label,
        "requests": summary.requests, "errors": summary.errors,
        "input_tokens": summary.input_tokens, "output_tokens": summary.output_tokens,
        "cost_nanos": summary.cost_nanos, "unpriced_requests": summary.unpriced_requests,
        "latency_p50_ms": summary.latency_p50_ms, "latency_p95_ms": summary.latency_p95_ms,
    }  # fmt: skip


def _end_user_row(user: EndUserUsage) -> dict[str, Any]:
    return {
        "key": user.end_user, "label": user.end_user, "requests": user.requests,
        "errors": user.errors, "input_tokens": user.input_tokens,
        "output_tokens": user.output_tokens, "cost_nanos": user.cost_nanos,
        "unpriced_requests": None, "latency_p50_ms": None, "latency_p95_ms": None,
    }  # fmt: skip


# ------------------------------------------------------------------ views


class _UsageView(ManagementAPIView):
    filter_backends: list[Any] = []
    pagination_class = None

    def query(self, serializer_class: type[serializers.Serializer[Any]]) -> dict[str, Any]:
        given = serializer_class(data=self.request.query_params, context={"org": self.caller.org})
        given.is_valid(raise_exception=True)
        return dict(given.validated_data)

    @staticmethod
    def freshness() -> dict[str, Any]:
        return {"complete_until": rollups_complete_until()}


class UsageSummaryView(_UsageView):
    @extend_schema(
        summary="Usage and spend of a period (by default this month so far)",
        parameters=[UsageWindowQuery],
        responses=UsageSummarySerializer,
    )
    def get(self, request: Request) -> Response:
        window = self.query(UsageWindowQuery)
        total = usage_report(org_id=self.caller.org.pk, **window)[1]
        figures = {**dataclasses.asdict(total), **window, **self.freshness()}
        return Response(UsageSummarySerializer(figures).data)


class UsageBreakdownView(_UsageView):
    @extend_schema(
        summary="Usage of a period grouped by team, key, model, provider, deployment, "
        "endpoint or tag",
        parameters=[UsageBreakdownQuery],
        responses=UsageBreakdownSerializer,
    )
    def get(self, request: Request) -> Response:
        query = self.query(UsageBreakdownQuery)
        groups, total = usage_report(org_id=self.caller.org.pk, **query)
        answer = {**query, "groups": groups, "total": total, **self.freshness()}
        return Response(UsageBreakdownSerializer(answer).data)


class UsageSeriesView(_UsageView):
    @extend_schema(
        summary="Usage per hour or day of a period",
        parameters=[UsageSeriesQuery],
        responses=UsageSeriesSerializer,
    )
    def get(self, request: Request) -> Response:
        query = {"model": None, **self.query(UsageSeriesQuery)}
        points = usage_series(org_id=self.caller.org.pk, **query)
        return Response(UsageSeriesSerializer({**query, "points": points, **self.freshness()}).data)


class CostReportView(_UsageView):
    @extend_schema(
        summary="Cost report: a period's usage and cost per group, with its total",
        parameters=[CostReportQuery],
        responses=CostReportSerializer,
    )
    def get(self, request: Request) -> Response:
        query = self.query(CostReportQuery)
        org_id, since, until = self.caller.org.pk, query["since"], query["until"]
        truncated = False
        if query["by"] == "end_user":
            total = usage_report(org_id=org_id, since=since, until=until, ttft=False)[1]
            users = usage_by_end_user(
                org_id=org_id, since=since, until=until, limit=END_USER_ROWS + 1
            )
            truncated = len(users) > END_USER_ROWS
            rows = [_end_user_row(user) for user in users[:END_USER_ROWS]]
        else:
            groups, total = usage_report(
                org_id=org_id, since=since, until=until, by=query["by"], ttft=False
            )
            rows = [_report_row(group) for group in groups]
        report = {
            **query, "covers_since": since, "covers_until": until, "rows": rows,
            "total": _report_row(total), "truncated": truncated, **self.freshness(),
        }  # fmt: skip
        return Response(CostReportSerializer(report).data)
