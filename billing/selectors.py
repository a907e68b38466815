"""Reads for billing: prices for the proxy snapshot, usage for screens."""

from dataclasses import dataclass
from datetime import datetime

from django.db.models import Count, Q, Sum

from billing.contracts import PriceRates
from billing.models import ModelPrice, UsageEvent


def price_rates_all() -> list[PriceRates]:
    """Every price row (list and overrides), for the proxy's snapshot."""
    return [
        PriceRates(
            price_id=row.pk,
            org_id=row.org_id,
            provider_kind=row.provider_kind,
            model=row.model,
            input_usd_per_mtok=row.input_usd_per_mtok,
            output_usd_per_mtok=row.output_usd_per_mtok,
            cached_input_usd_per_mtok=row.cached_input_usd_per_mtok,
            reasoning_usd_per_mtok=row.reasoning_usd_per_mtok,
            effective_from=row.effective_from,
            effective_until=row.effective_until,
        )
        for row in ModelPrice.objects.all()
    ]


@dataclass(frozen=True, slots=True)
class UsageTotals:
    requests: int
    errors: int
    input_tokens: int
    output_tokens: int
    cost_nanos: int


def usage_totals(*, org_id: int, since: datetime, until: datetime) -> UsageTotals:
    """Request, error, token and cost totals for `org_id` in [since, until)."""
    totals = UsageEvent.objects.filter(
        org_id=org_id, started_at__gte=since, started_at__lt=until
    ).aggregate(
        requests=Count("id"),
        errors=Count("id", filter=~Q(outcome=UsageEvent.Outcome.SUCCESS)),
        input_tokens=Sum("input_tokens"),
        output_tokens=Sum("output_tokens"),
        cost_nanos=Sum("cost_nanos"),
    )
    return UsageTotals(**{name: value or 0 for name, value in totals.items()})


@dataclass(frozen=True, slots=True)
class ModelSpend:
    model: str
    requests: int
    cost_nanos: int


def spend_by_model(*, org_id: int, since: datetime, until: datetime) -> list[ModelSpend]:
    """Requests and cost per public model name in [since, until), costliest first."""
    rows = (
        UsageEvent.objects.filter(org_id=org_id, started_at__gte=since, started_at__lt=until)
        .values("model")
        .annotate(requests=Count("id"), cost_nanos=Sum("cost_nanos"))
        .order_by("-cost_nanos", "model")
    )
    return [
        ModelSpend(model=row["model"], requests=row["requests"], cost_nanos=row["cost_nanos"] or 0)
        for row in rows
    ]


@dataclass(frozen=True, slots=True)
class RecentRequest:
    event_id: str
    started_at: datetime
    key_prefix: str
    model: str
    status_code: int
    outcome: str
    input_tokens: int
    output_tokens: int
    cost_nanos: int
    latency_ms: int | None
    is_stream: bool


def recent_requests(*, org_id: int, limit: int = 25) -> list[RecentRequest]:
    """The org's latest requests, newest first."""
    rows = (
        UsageEvent.objects.filter(org_id=org_id)
        .order_by("-started_at")
        .values(
            "id", "started_at", "key__prefix", "model", "status_code", "outcome",
            "input_tokens", "output_tokens", "cost_nanos", "latency_ms", "is_stream",
        )[:limit]
    )  # fmt: skip
    return [
        RecentRequest(
            event_id=str(row["id"]),
            started_at=row["started_at"],
            key_prefix=row["key__prefix"] or "",
            model=row["model"],
            status_code=row["status_code"],
            outcome=row["outcome"],
            input_tokens=row["input_tokens"],
            output_tokens=row["output_tokens"],
            cost_nanos=row["cost_nanos"],
            latency_ms=row["latency_ms"],
            is_stream=row["is_stream"],
        )
        for row in rows
    ]
