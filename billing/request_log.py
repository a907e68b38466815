"""Reads for the request log: raw events newest first, a page at a time, filtered, and
one request in full (its attempts, price and stored bodies)."""

import uuid
from dataclasses import dataclass
from datetime import datetime

from django.db import connection
from django.db.models import (
    Exists,
    OuterRef,
    Q,
    QuerySet,
    TextField,
)
from django.db.models.functions import Cast

from billing.contracts import PriceRates, UpstreamAttempt
from billing.models import (
    ModelPrice,
    RollupMeasures,
    UsageEvent,
    UsageEventBody,
    UsageRollup,
)
from billing.rollups import (
    day_floor,
    distinct_tags,
)
from tenants.models import Team, VirtualKey

Granularity = RollupMeasures.Granularity

# The request log reads raw events newest first, a page at a time, keyset-paged on
# (started_at, id) so a deep page costs what the first one does. Every filter is an
# equality or range the (org | team | key, started_at) indexes serve.

REQUEST_LOG_PAGE_SIZE = 50


@dataclass(frozen=True, slots=True)
class RequestLogFilter:
    """What the request log is narrowed to; empty values do not narrow."""

    key_id: int | None = None
    team_id: int | None = None
    model: str = ""
    outcome: str = ""
    status_code: int | None = None
    tag: str = ""
    end_user: str = ""
    since: datetime | None = None
    until: datetime | None = None


@dataclass(frozen=True, slots=True)
class RequestLogEntry:
    """One row of the request log."""

    event_id: uuid.UUID
    started_at: datetime
    key_prefix: str
    key_name: str
    endpoint: str
    model: str
    deployment_name: str
    outcome: str
    status_code: int
    input_tokens: int
    output_tokens: int
    cost_nanos: int
    latency_ms: int | None
    ttft_ms: int | None
    attempts: int
    tags: tuple[str, ...]
    cache_hit: bool
    is_stream: bool


_REQUEST_LOG_COLUMNS = (
    "id", "started_at", "key__prefix", "key__name", "endpoint", "model", "deployment_name",
    "outcome", "status_code", "input_tokens", "output_tokens", "cost_nanos", "latency_ms",
    "ttft_ms", "attempts", "tags", "cache_hit", "is_stream",
)  # fmt: skip


def _with_tag(events: QuerySet[UsageEvent], tag: str) -> QuerySet[UsageEvent]:
    """Events carrying `tag`. PostgreSQL: jsonb containment. SQLite has none, but
    tags are validated to characters JSON never escapes, so `"tag"` in the text is exact."""
    if connection.vendor == "postgresql":
        return events.filter(tags__contains=[tag])
    return events.annotate(tags_text=Cast("tags", TextField())).filter(
        tags_text__contains=f'"{tag}"'
    )


def _request_log_events(*, org_id: int, filters: RequestLogFilter) -> QuerySet[UsageEvent]:
    events = UsageEvent.objects.filter(org_id=org_id)
    if filters.key_id is not None:
        events = events.filter(key_id=filters.key_id)
    if filters.team_id is not None:
        events = events.filter(team_id=filters.team_id)
    if filters.model:
        events = events.filter(model=filters.model)
    if filters.outcome:
        events = events.filter(outcome=filters.outcome)
    if filters.status_code is not None:
        events = events.filter(status_code=filters.status_code)
    if filters.end_user:
        events = events.filter(end_user=filters.end_user)
    if filters.since is not None:
        events = events.filter(started_at__gte=filters.since)
    if filters.until is not None:
        events = events.filter(started_at__lt=filters.until)
    if filters.tag:
        events = _with_tag(events, filters.tag)
    return events


def request_log_page(
    *,
    org_id: int,
    filters: RequestLogFilter = RequestLogFilter(),
    before: tuple[datetime, uuid.UUID] | None = None,
    limit: int = REQUEST_LOG_PAGE_SIZE,
) -> list[RequestLogEntry]:
    """Up to `limit` of the org's requests matching `filters`, newest first; pass the
    last entry's (started_at, event_id) as `before` for the next (older) page."""
    events = _request_log_events(org_id=org_id, filters=filters)
    if before is not None:
        started_at, event_id = before
        # The plain bound lets the index range-scan; the OR only breaks ties.
        events = events.filter(started_at__lte=started_at).filter(
            Q(started_at__lt=started_at) | Q(id__lt=event_id)
        )
    rows = events.order_by("-started_at", "-id").values_list(*_REQUEST_LOG_COLUMNS)[:limit]
    return [
        RequestLogEntry(
            event_id=event_id, started_at=started_at, key_prefix=key_prefix or "",
            key_name=key_name or "", endpoint=endpoint, model=model,
            deployment_name=deployment_name, outcome=outcome, status_code=status_code,
            input_tokens=input_tokens, output_tokens=output_tokens, cost_nanos=cost_nanos,
            latency_ms=latency_ms, ttft_ms=ttft_ms, attempts=attempts,
            tags=tuple(distinct_tags(tags)), cache_hit=cache_hit, is_stream=is_stream,
        )
        for (event_id, started_at, key_prefix, key_name, endpoint, model, deployment_name,
             outcome, status_code, input_tokens, output_tokens, cost_nanos, latency_ms, ttft_ms,
             attempts, tags, cache_hit, is_stream) in rows
    ]  # fmt: skip


@dataclass(frozen=True, slots=True)
class KeyChoice:
    key_id: int
    prefix: str
    name: str
    revoked: bool


def request_log_keys(*, org_id: int, team_id: int | None = None) -> list[KeyChoice]:
    """The org's keys (one team's, with `team_id`), revoked ones too: their requests stay."""
    keys = VirtualKey.objects.filter(org_id=org_id)
    if team_id is not None:
        keys = keys.filter(team_id=team_id)
    rows = keys.order_by("name", "prefix").values_list("id", "prefix", "name", "revoked_at")
    return [
        KeyChoice(key_id=key_id, prefix=prefix, name=name, revoked=revoked_at is not None)
        for key_id, prefix, name, revoked_at in rows
    ]


def request_log_teams(*, org_id: int) -> list[tuple[int, str]]:
    """The org's teams as (id, name), by name, for the request log's team filter."""
    return list(Team.objects.filter(org_id=org_id).order_by("name").values_list("pk", "name"))


def request_log_models(*, org_id: int, since: datetime) -> list[str]:
    """Models the org's requests asked for since `since`, from the day rollups (cheap)."""
    return list(
        UsageRollup.objects.filter(
            org_id=org_id, granularity=Granularity.DAY, bucket_start__gte=day_floor(since)
        )
        .exclude(model="")
        .order_by("model")
        .values_list("model", flat=True)
        .distinct()
    )


@dataclass(frozen=True, slots=True)
class RequestDetail:
    """Everything the ledger knows about one request (bodies excepted: see request_bodies)."""

    event_id: uuid.UUID
    org_id: int
    team_id: int | None
    team_name: str
    key_id: int | None
    key_prefix: str
    key_name: str
    endpoint: str
    model: str
    upstream_model: str
    provider_kind: str
    deployment_id: int | None
    deployment_name: str
    outcome: str
    outcome_label: str
    status_code: int
    error_class: str
    input_tokens: int
    cached_input_tokens: int
    output_tokens: int
    reasoning_tokens: int
    usage_estimated: bool
    cost_nanos: int
    priced: bool
    price: PriceRates | None
    cache_hit: bool
    is_stream: bool
    attempts: int
    attempt_log: tuple[UpstreamAttempt, ...]
    latency_ms: int | None
    ttft_ms: int | None
    tags: tuple[str, ...]
    end_user: str
    started_at: datetime
    finished_at: datetime
    ingested_at: datetime
    has_bodies: bool


def _attempt_from(entry: object) -> UpstreamAttempt | None:
    """One stored attempt, or None if the row is not one (hand-edited, or a future shape)."""
    if not isinstance(entry, dict):
        return None
    try:
        return UpstreamAttempt(
            deployment_id=int(entry.get("deployment_id") or 0),
            deployment_name=str(entry.get("deployment_name", "")),
            provider_kind=str(entry.get("provider_kind", "")),
            outcome=str(entry.get("outcome", "")),
            status_code=int(entry.get("status_code") or 0),
            error_class=str(entry.get("error_class", "")),
            started_ms=int(entry.get("started_ms") or 0),
            duration_ms=int(entry.get("duration_ms") or 0),
            ttfb_ms=None if entry.get("ttfb_ms") is None else int(entry["ttfb_ms"]),
        )
    except (TypeError, ValueError):
        return None


def _price_rates(price: ModelPrice | None) -> PriceRates | None:
    if price is None:
        return None
    return PriceRates(
        price_id=price.pk, org_id=price.org_id, provider_kind=price.provider_kind,
        model=price.model, input_usd_per_mtok=price.input_usd_per_mtok,
        output_usd_per_mtok=price.output_usd_per_mtok,
        cached_input_usd_per_mtok=price.cached_input_usd_per_mtok,
        reasoning_usd_per_mtok=price.reasoning_usd_per_mtok,
        effective_from=price.effective_from, effective_until=price.effective_until,
    )  # fmt: skip


def request_detail(
    *, org_id: int, event_id: uuid.UUID, team_id: int | None = None
) -> RequestDetail | None:
    """One of the org's requests (of one team, with `team_id`), or None: another org's
    or team's request is as absent as one that never was. One query."""
    events = UsageEvent.objects.filter(org_id=org_id, pk=event_id)
    if team_id is not None:
        events = events.filter(team_id=team_id)
    stored_bodies = UsageEventBody.objects.filter(event_id=OuterRef("pk"))
    event = (
        events.select_related("key", "team", "price")
        .annotate(has_bodies=Exists(stored_bodies))
        .first()
    )
    if event is None:
        return None
    attempts = tuple(
        attempt for attempt in map(_attempt_from, event.attempt_log or ()) if attempt is not None
    )
    return RequestDetail(
        event_id=event.pk, org_id=event.org_id, team_id=event.team_id,
        team_name=event.team.name if event.team else "", key_id=event.key_id,
        key_prefix=event.key.prefix if event.key else "",
        key_name=event.key.name if event.key else "", endpoint=event.endpoint,
        model=event.model, upstream_model=event.upstream_model,
        provider_kind=event.provider_kind, deployment_id=event.deployment_id,
        deployment_name=event.deployment_name, outcome=event.outcome,
        outcome_label=event.get_outcome_display(), status_code=event.status_code,
        error_class=event.error_class, input_tokens=event.input_tokens,
        cached_input_tokens=event.cached_input_tokens, output_tokens=event.output_tokens,
        reasoning_tokens=event.reasoning_tokens, usage_estimated=event.usage_estimated,
        cost_nanos=event.cost_nanos, priced=event.priced, price=_price_rates(event.price),
        cache_hit=event.cache_hit, is_stream=event.is_stream, attempts=event.attempts,
        attempt_log=attempts, latency_ms=event.latency_ms, ttft_ms=event.ttft_ms,
        tags=tuple(distinct_tags(event.tags)), end_user=event.end_user,
        started_at=event.started_at, finished_at=event.finished_at,
        ingested_at=event.ingested_at, has_bodies=event.has_bodies,  # type: ignore[attr-defined]
    )  # fmt: skip


@dataclass(frozen=True, slots=True)
class StoredBodies:
    request: str
    request_truncated: bool
    response: str
    response_truncated: bool


def request_bodies(*, org_id: int, event_id: uuid.UUID) -> StoredBodies | None:
    """The logged bodies of one of the org's requests, if any were kept.

    Callers decide who may see them: bodies are for admins and the request's own team.
    """
    row = (
        UsageEventBody.objects.filter(org_id=org_id, event_id=event_id)
        .values_list("request_body", "request_truncated", "response_body", "response_truncated")
        .first()
    )
    return StoredBodies(*row) if row else None
