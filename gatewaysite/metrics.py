"""GET /metrics: the gateway's Prometheus metrics (text format 0.0.4).

Served by `gatewaysite/asgi.py` before Django, like the health probes: no middleware
and no ALLOWED_HOSTS check, so Prometheus can scrape each replica by its address. A
scrape must come from TOLLGATE_METRICS_ALLOW_NETWORKS (loopback by default) and
present TOLLGATE_METRICS_TOKEN when one is set; otherwise 403 or 401, with nothing
about the metrics in the answer. The address judged is the client's as the server
reports it: uvicorn takes it from X-Forwarded-For only when the peer is one of its
FORWARDED_ALLOW_IPS (127.0.0.1 by default).

What is served:
- the proxy's counters and histograms (`routing/proxy/observe.py`), summed over the
  web workers: this process's live ones plus the others' snapshot files;
- circuit breakers, as this process sees them (replicas share them within a second);
- spend this month per org and team (rollups plus the events not rolled up yet),
  org and team budgets against their limits (the budget counters the proxy enforces),
  and the usage ingestion queue: read at most every TOLLGATE_METRICS_CACHE_SECONDS,
  by one scrape at a time, so frequent scrapes do not load the database.
"""

import asyncio
import dataclasses
import functools
import hmac
import ipaddress
import logging
import os
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import redis.asyncio
import redis.exceptions
from django.conf import settings
from django.db import connections
from django.db.models import Q, QuerySet, Sum
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from billing.budget_counters import BudgetLine
from billing.budget_ledger import budget_line_at
from billing.budget_periods import budget_window
from billing.models import RollupMeasures, UsageEvent, UsageTeamRollup
from billing.rollups import hour_floor
from billing.selectors import rollups_complete_until
from billing.stream import USAGE_GROUP
from routing.errors import AuthenticationFailed, GatewayError, MethodNotAllowed, PermissionDenied
from routing.health import CircuitState
from routing.proxy import observe
from routing.proxy.http import (
    ClientGone,
    Receive,
    Response,
    Scope,
    Send,
    error_response,
    read_request,
    send_response,
)
from routing.proxy.runtime import ProxyRuntime
from tenants.models import Budget, Organization, Team

logger = logging.getLogger(__name__)

T = TypeVar("T")

METRICS_PATH = "/metrics"
# Headers a reverse proxy adds: such a request's real origin is not its peer address.
_FORWARDING_HEADERS = ("forwarded", "x-forwarded-for", "x-real-ip")
# A scrape waits this long for the database and Redis, then is served without them.
_STORED_GAUGES_WAIT_S = 5.0
_REDIS_TIMEOUT_S = 2.0
_NANOS_PER_USD = 1_000_000_000
_HOUR = RollupMeasures.Granularity.HOUR
_ONE_HOUR = timedelta(hours=1)
_MAX_BODY_BYTES = 1024  # a scrape has no body
# Higher is worse: deployments that share a name (under other providers) show the worst.
_STATE_RANK = {CircuitState.OPEN: 2, CircuitState.HALF_OPEN: 1, CircuitState.CLOSED: 0}


# ---------------------------------------------------------------- who may scrape


@functools.lru_cache(maxsize=8)
def _networks(
    allowed: tuple[str, ...],
) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(network, strict=False) for network in allowed)


def _address(host: str | None) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    if not host:
        return None
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None  # a Unix socket's path, or a name: no network address
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _bearer(headers: Mapping[str, str]) -> str | None:
    scheme, _, credentials = headers.get("authorization", "").partition(" ")
    return credentials.strip() or None if scheme.lower() == "bearer" else None


def metrics_refusal(
    client_host: str | None,
    headers: Mapping[str, str],
    *,
    token: str,
    allowed_networks: Sequence[str],
) -> GatewayError | None:
    """Why this scrape is refused (403: its address, 401: its token), or None.

    A request relayed by a proxy (it carries forwarding headers) is never served on
    its address alone, only with the token: a reverse proxy on the same host would
    otherwise lend every outside client its loopback address. A client without a
    network address (a Unix socket) needs the token too.
    """
    refused = PermissionDenied("Metrics are not served to this client.", code="metrics_refused")
    address = _address(client_host)
    if address is not None:
        if not any(address in network for network in _networks(tuple(allowed_networks))):
            return refused
    elif not token:
        return refused
    if not token:
        if any(name in headers for name in _FORWARDING_HEADERS):
            return refused
        return None
    presented = _bearer(headers)
    if presented is None or not hmac.compare_digest(presented.encode(), token.encode()):
        return AuthenticationFailed(
            "Send the metrics token as 'Authorization: Bearer <token>'.",
            code="metrics_token_required",
            headers={"www-authenticate": 'Bearer realm="tollgate-metrics"'},
        )
    return None


# ---------------------------------------------------------------- stored gauges


@dataclass(frozen=True, slots=True)
class BudgetGauge:
    org: str
    team: str  # "" for an org budget
    scope: str
    period: str
    budget_id: int
    limit_nanos: int
    settled_nanos: int | None  # None: no counter this period yet (or Redis lost it)


@dataclass(frozen=True, slots=True)
class StoredGauges:
    """What a scrape reads from the database and Redis (cached between scrapes)."""

    database_up: bool
    redis_up: bool | None  # None: no Redis configured
    org_month_nanos: Mapping[str, int] = field(default_factory=dict)  # org slug ->
    team_month_nanos: Mapping[tuple[str, str], int] = field(default_factory=dict)
    budgets: tuple[BudgetGauge, ...] = ()
    stream_length: int | None = None
    stream_pending: int | None = None


def _closing_connections(function: Callable[[], T]) -> Callable[[], T]:
    def run() -> T:
        try:
            return function()
        finally:
            connections.close_all()  # outside Django's request cycle nothing else would

    return run


def month_spend_nanos(
    now: datetime, orgs: Sequence[tuple[int, str]]
) -> dict[tuple[int, int | None], int]:
    """Cost of each (org id, team id or None) since its org's calendar month began.

    The rollup hours that hold every event, plus the raw events around them (the
    partial first hour of a month that starts off the hour, and what the rollup job
    has not folded in yet): two queries per distinct month start, whatever the volume.
    """
    edge = rollups_complete_until()
    edge = None if edge is None else min(edge, hour_floor(now))
    by_start: dict[datetime, list[int]] = defaultdict(list)
    for org_id, time_zone in orgs:
        by_start[budget_window("monthly", time_zone, now).start_at].append(org_id)
    spend: dict[tuple[int, int | None], int] = defaultdict(int)
    for since, org_ids in by_start.items():
        rolled_from = since if hour_floor(since) == since else hour_floor(since) + _ONE_HOUR
        rolled_until = rolled_from if edge is None else max(rolled_from, edge)
        parts: list[QuerySet[Any]] = [
            UsageEvent.objects.filter(org_id__in=org_ids).filter(
                Q(started_at__gte=since, started_at__lt=rolled_from)
                | Q(started_at__gte=rolled_until)
            )
        ]
        if rolled_until > rolled_from:
            parts.append(
                UsageTeamRollup.objects.filter(
                    org_id__in=org_ids,
                    granularity=_HOUR,
                    bucket_start__gte=rolled_from,
                    bucket_start__lt=rolled_until,
                )
            )
        for rows in parts:
            for row in rows.order_by().values("org_id", "team_id").annotate(cost=Sum("cost_nanos")):
                spend[(row["org_id"], row["team_id"])] += int(row["cost"] or 0)
    return spend


@dataclass(frozen=True, slots=True)
class _Tenants:
    org_month_nanos: Mapping[str, int]
    team_month_nanos: Mapping[tuple[str, str], int]
    budget_lines: tuple[tuple[BudgetGauge, BudgetLine], ...]


def _tenants_read(now: datetime) -> _Tenants:
    """Spend this month per org and team, and the org and team budgets (not the keys':
    no per-key series) with their current period's line."""
    orgs = list(Organization.objects.order_by("pk").values_list("pk", "slug", "time_zone"))
    org_slugs = {pk: slug for pk, slug, _ in orgs}
    teams = {
        pk: (org_id, slug) for pk, org_id, slug in Team.objects.values_list("pk", "org_id", "slug")
    }
    org_month = dict.fromkeys(org_slugs.values(), 0)
    team_month = {
        (org_slugs[org_id], slug): 0 for org_id, slug in teams.values() if org_id in org_slugs
    }
    spend = month_spend_nanos(now, [(pk, time_zone) for pk, _, time_zone in orgs])
    for (org_id, team_id), nanos in spend.items():
        org_slug = org_slugs.get(org_id)
        if org_slug is None:
            continue
        org_month[org_slug] += nanos
        team = teams.get(team_id) if team_id is not None else None
        if team is not None and (org_slug, team[1]) in team_month:
            team_month[(org_slug, team[1])] += nanos
    budgets = Budget.objects.filter(scope__in=(Budget.Scope.ORG, Budget.Scope.TEAM))
    lines = tuple(
        (
            BudgetGauge(
                org=budget.org.slug,
                team=budget.team.slug if budget.team is not None else "",
                scope=budget.scope,
                period=budget.period,
                budget_id=budget.pk,
                limit_nanos=budget.limit_nanos,
                settled_nanos=None,
            ),
            budget_line_at(budget, now),
        )
        for budget in budgets.select_related("org", "team").order_by("pk")
    )
    return _Tenants(org_month_nanos=org_month, team_month_nanos=team_month, budget_lines=lines)


async def usage_stream_depth() -> tuple[int, int]:
    """(entries in the usage stream, entries a worker took but has not acknowledged)."""
    client = redis.asyncio.Redis.from_url(
        settings.REDIS_URL,
        socket_timeout=_REDIS_TIMEOUT_S,
        socket_connect_timeout=_REDIS_TIMEOUT_S,
    )
    try:
        async with client.pipeline(transaction=False) as pipe:
            pipe.xlen(settings.TOLLGATE_USAGE_STREAM)
            pipe.xpending(settings.TOLLGATE_USAGE_STREAM, USAGE_GROUP)
            length, pending = await pipe.execute(raise_on_error=False)
    finally:
        await client.aclose()
    if isinstance(length, Exception):
        raise length
    if isinstance(pending, redis.exceptions.ResponseError):
        return int(length), 0  # no consumer group yet: nothing taken
    if isinstance(pending, Exception):
        raise pending
    return int(length), int(pending["pending"])


class StoredGaugeReader:
    """Reads `StoredGauges` at most every TOLLGATE_METRICS_CACHE_SECONDS; concurrent
    scrapes share one read, and one that takes too long is not waited for."""

    def __init__(self, runtime: ProxyRuntime) -> None:
        self._runtime = runtime
        self._last: StoredGauges | None = None
        self._last_at = 0.0
        self._running: asyncio.Task[StoredGauges] | None = None

    async def read(self) -> StoredGauges:
        max_age_s = settings.TOLLGATE_METRICS_CACHE_SECONDS
        if self._last is not None and time.monotonic() - self._last_at < max_age_s:
            return self._last
        if self._running is None:
            self._running = asyncio.create_task(self._refresh(), name="tollgate-metrics-gauges")
        try:
            async with asyncio.timeout(_STORED_GAUGES_WAIT_S):
                # Shielded: a scrape that gives up must not cancel the read for the next.
                return await asyncio.shield(self._running)
        except TimeoutError:
            logger.warning("Metrics: the database or Redis did not answer within %s s",
                           _STORED_GAUGES_WAIT_S)  # fmt: skip
            return StoredGauges(database_up=False, redis_up=False if settings.REDIS_URL else None)

    async def _refresh(self) -> StoredGauges:
        try:
            gauges = await self._read_all()
            self._last, self._last_at = gauges, time.monotonic()
            return gauges
        finally:
            self._running = None

    async def _read_all(self) -> StoredGauges:
        now = datetime.now(UTC)
        with_redis = bool(settings.REDIS_URL)
        redis_up: bool | None = True if with_redis else None
        try:
            tenants = await asyncio.to_thread(_closing_connections(lambda: _tenants_read(now)))
        except Exception as exc:  # every way the database can fail: the gauge says so
            logger.warning("Metrics: reading spend and budgets failed: %r", exc)
            tenants = None
        budgets: tuple[BudgetGauge, ...] = ()
        if tenants is not None and tenants.budget_lines:
            gauges = [gauge for gauge, _ in tenants.budget_lines]
            try:
                async with asyncio.timeout(_REDIS_TIMEOUT_S):
                    spends = await self._runtime.counters.spent(
                        [line for _, line in tenants.budget_lines]
                    )
                budgets = tuple(
                    dataclasses.replace(gauge, settled_nanos=spend.settled_nanos)
                    for gauge, spend in zip(gauges, spends, strict=True)
                )
            except Exception as exc:  # counters unreadable: limits only
                logger.warning("Metrics: reading the budget counters failed: %r", exc)
                budgets = tuple(gauges)
                redis_up = False if with_redis else redis_up
        stream_length = stream_pending = None
        if with_redis:
            try:
                async with asyncio.timeout(_REDIS_TIMEOUT_S):
                    stream_length, stream_pending = await usage_stream_depth()
            except Exception as exc:
                logger.warning("Metrics: reading the usage stream failed: %r", exc)
                redis_up = False
        return StoredGauges(
            database_up=tenants is not None,
            redis_up=redis_up,
            org_month_nanos=tenants.org_month_nanos if tenants else {},
            team_month_nanos=tenants.team_month_nanos if tenants else {},
            budgets=budgets,
            stream_length=stream_length,
            stream_pending=stream_pending,
        )


# ---------------------------------------------------------------- the exposition


def _usd(nanos: int) -> float:
    return nanos / _NANOS_PER_USD  # Prometheus samples are floats: only at this edge


def _status_class(code: int) -> str:
    return f"{code // 100}xx" if 100 <= code <= 599 else "other"


def _histogram(
    name: str, documentation: str, histograms: Mapping[tuple[str, str], observe.Histogram],
    bounds: Sequence[float],
) -> HistogramMetricFamily:  # fmt: skip
    family = HistogramMetricFamily(name, documentation, labels=["route", "deployment"])
    edges = [floatToGoString(bound) for bound in bounds] + ["+Inf"]
    for labels, histogram in sorted(histograms.items()):
        cumulative, buckets = 0, []
        for edge, count in zip(edges, histogram.counts, strict=True):
            cumulative += count
            buckets.append((edge, cumulative))
        family.add_metric(list(labels), buckets, histogram.sum)
    return family


@dataclass(frozen=True, slots=True)
class ScrapeView:
    """Everything one scrape serves."""

    metrics: observe.ProxyMetrics
    processes_running: int
    processes_exited: int
    process_gauges: Mapping[str, float]
    circuits: Mapping[str, CircuitState]
    stored: StoredGauges


def metric_families(view: ScrapeView) -> Iterator[Metric]:
    """The scrape's metric families, in a stable order."""
    metrics, stored = view.metrics, view.stored
    requests = CounterMetricFamily(
        "tollgate_requests",
        "Requests to /v1 by endpoint, route (public model name; 'other': not configured, "
        "'none': refused before routing), deployment that answered, status code and outcome.",
        labels=["endpoint", "route", "deployment", "code", "status_class", "outcome"],
    )
    for (endpoint, route, deployment, code, outcome), count in sorted(metrics.requests.items()):
        labels = [endpoint, route, deployment, str(code), _status_class(code), outcome]
        requests.add_metric(labels, count)
    yield requests
    yield _histogram(
        "tollgate_request_duration_seconds",
        "Time from a /v1 request's arrival to the end of its answer (a stream: its last event).",
        metrics.latency,
        observe.LATENCY_BUCKETS_S,
    )
    yield _histogram(
        "tollgate_time_to_first_token_seconds",
        "Time from a streamed request's arrival to its first event relayed to the client.",
        metrics.ttft,
        observe.TTFT_BUCKETS_S,
    )
    tokens = CounterMetricFamily(
        "tollgate_tokens",
        "Tokens billed, by route, deployment and type (input or output).",
        labels=["route", "deployment", "type"],
    )
    for (route, deployment), (input_tokens, output_tokens) in sorted(metrics.tokens.items()):
        tokens.add_metric([route, deployment, "input"], input_tokens)
        tokens.add_metric([route, deployment, "output"], output_tokens)
    yield tokens
    attempts = CounterMetricFamily(
        "tollgate_upstream_attempts",
        "Calls to provider deployments (a retry or a failover is another call).",
        labels=["deployment"],
    )
    for deployment, count in sorted(metrics.upstream_attempts.items()):
        attempts.add_metric([deployment], count)
    yield attempts
    errors = CounterMetricFamily(
        "tollgate_upstream_errors",
        "Failed calls to provider deployments, by deployment and error class.",
        labels=["deployment", "error_class"],
    )
    for (deployment, error_class), count in sorted(metrics.upstream_errors.items()):
        errors.add_metric([deployment, error_class], count)
    yield errors
    fallbacks = CounterMetricFamily(
        "tollgate_fallbacks",
        "Requests answered by another deployment than their first attempt's: another of "
        "the route's own (kind=deployment) or a fallback route's (kind=route).",
        labels=["route", "deployment", "kind"],
    )
    for (route, deployment, kind), count in sorted(metrics.fallbacks.items()):
        fallbacks.add_metric([route, deployment, kind], count)
    yield fallbacks
    cache = CounterMetricFamily(
        "tollgate_cache_requests",
        "Answered requests on routes with a response cache, by result (hit, miss, bypass).",
        labels=["route", "result"],
    )
    for (route, result), count in sorted(metrics.cache.items()):
        cache.add_metric([route, result], count)
    yield cache
    circuits = GaugeMetricFamily(
        "tollgate_deployment_circuit_state",
        "Circuit breaker of each configured deployment: 1 for its current state, as the "
        "process that answered the scrape sees it.",
        labels=["deployment", "state"],
    )
    for deployment, current in sorted(view.circuits.items()):
        for state in CircuitState:
            circuits.add_metric([deployment, state.value], 1.0 if state is current else 0.0)
    yield circuits
    yield from _stored_families(stored)
    yield from _process_families(view)


def _stored_families(stored: StoredGauges) -> Iterator[Metric]:
    org_spend = GaugeMetricFamily(
        "tollgate_org_month_spend_usd",
        "Spend of each organization since its calendar month began (its time zone).",
        labels=["org"],
    )
    for org, nanos in sorted(stored.org_month_nanos.items()):
        org_spend.add_metric([org], _usd(nanos))
    yield org_spend
    team_spend = GaugeMetricFamily(
        "tollgate_team_month_spend_usd",
        "Spend of each team since its organization's calendar month began.",
        labels=["org", "team"],
    )
    for (org, team), nanos in sorted(stored.team_month_nanos.items()):
        team_spend.add_metric([org, team], _usd(nanos))
    yield team_spend
    budget_labels = ["org", "team", "scope", "period", "budget_id"]
    limit = GaugeMetricFamily(
        "tollgate_budget_limit_usd", "Limit of each org and team budget.", labels=budget_labels
    )
    spent = GaugeMetricFamily(
        "tollgate_budget_spend_usd",
        "Settled spend of each org and team budget in its current period (budget counters).",
        labels=budget_labels,
    )
    utilization = GaugeMetricFamily(
        "tollgate_budget_utilization_ratio",
        "Settled spend over limit of each org and team budget in its current period.",
        labels=budget_labels,
    )
    for budget in stored.budgets:
        labels = [budget.org, budget.team, budget.scope, budget.period, str(budget.budget_id)]
        limit.add_metric(labels, _usd(budget.limit_nanos))
        if budget.settled_nanos is not None:
            spent.add_metric(labels, _usd(budget.settled_nanos))
            utilization.add_metric(labels, budget.settled_nanos / budget.limit_nanos)
    yield limit
    yield spent
    yield utilization
    if stored.stream_length is not None:
        yield GaugeMetricFamily(
            "tollgate_usage_stream_length",
            "Usage events in the Redis stream, not yet written to the ledger.",
            value=stored.stream_length,
        )
    if stored.stream_pending is not None:
        yield GaugeMetricFamily(
            "tollgate_usage_stream_pending",
            "Usage events a Celery worker took from the stream and has not acknowledged yet.",
            value=stored.stream_pending,
        )
    up = GaugeMetricFamily(
        "tollgate_metrics_source_up",
        "Whether this scrape could read each source of the gauges above (1) or not (0).",
        labels=["source"],
    )
    up.add_metric(["database"], 1.0 if stored.database_up else 0.0)
    if stored.redis_up is not None:
        up.add_metric(["redis"], 1.0 if stored.redis_up else 0.0)
    yield up


def _process_families(view: ScrapeView) -> Iterator[Metric]:
    gauges = view.process_gauges
    yield GaugeMetricFamily(
        "tollgate_usage_buffered_events",
        "Usage events held in the web processes' memory, not yet handed to the stream "
        "(Redis) or written to the ledger (embedded default).",
        value=gauges.get(observe.USAGE_BUFFERED, 0.0),
    )
    if observe.USAGE_SPOOLED in gauges:
        yield GaugeMetricFamily(
            "tollgate_usage_spooled_events",
            "Usage events the web processes spooled to disk while Redis was away.",
            value=gauges[observe.USAGE_SPOOLED],
        )
    processes = GaugeMetricFamily(
        "tollgate_metrics_processes",
        "Web processes whose counters this scrape sums: still running, or exited.",
        labels=["state"],
    )
    processes.add_metric(["running"], view.processes_running)
    processes.add_metric(["exited"], view.processes_exited)
    yield processes


class _Families(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self._families)


def exposition(view: ScrapeView) -> bytes:
    """The scrape in Prometheus text format 0.0.4."""
    return generate_latest(_Families(list(metric_families(view))))


def scrape_render(
    own: Mapping[str, Any], gauges: Mapping[str, float], circuits: Mapping[str, CircuitState],
    stored: StoredGauges, directory: Path | None,
) -> bytes:  # fmt: skip
    """The exposition of this process's counters (`own`, a snapshot) and gauges plus the
    other workers' files in `directory` (blocking: file reads)."""
    merged = observe.ProxyMetrics()
    merged.add_snapshot(own)
    summed = dict(gauges)
    running, exited = 1, 0
    for snapshot in observe.read_snapshots(directory, skip_pid=os.getpid()) if directory else ():
        merged.merge(snapshot.metrics)
        if not snapshot.alive:
            exited += 1
            continue  # its counters count; its gauges died with it
        running += 1
        for name, value in snapshot.gauges.items():
            summed[name] = summed.get(name, 0.0) + value
    return exposition(
        ScrapeView(
            metrics=merged,
            processes_running=running,
            processes_exited=exited,
            process_gauges=summed,
            circuits=circuits,
            stored=stored,
        )
    )


# ---------------------------------------------------------------- the ASGI application


class MetricsApp:
    """Serves /metrics; one instance per process, beside the proxy it reports on."""

    def __init__(self, *, runtime: ProxyRuntime) -> None:
        self._runtime = runtime
        self._stored = StoredGaugeReader(runtime)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            request = await read_request(scope, receive, max_bytes=_MAX_BODY_BYTES)
        except ClientGone:
            return
        except GatewayError as exc:
            await send_response(send, error_response(exc))
            return
        refusal = metrics_refusal(
            request.client_host,
            request.headers,
            token=settings.TOLLGATE_METRICS_TOKEN,
            allowed_networks=settings.TOLLGATE_METRICS_ALLOW_NETWORKS,
        )
        if refusal is None and request.method != "GET":
            refusal = MethodNotAllowed(
                f"{request.method} is not allowed on {METRICS_PATH}; use GET.",
                headers={"allow": "GET"},
            )
        if refusal is not None:
            await send_response(send, error_response(refusal))
            return
        body = await self.render()
        headers = {"cache-control": "no-store", "x-tollgate-worker-pid": str(os.getpid())}
        await send_response(
            send,
            Response(status=200, body=body, headers=headers, content_type=CONTENT_TYPE_PLAIN_0_0_4),
        )

    async def render(self) -> bytes:
        """The scrape: this process's live counters plus the other workers' snapshots.

        Only the copies are taken on the event loop; merging and writing the text
        (tens of milliseconds with thousands of series) run in a thread, so requests
        on this worker are not held up by a scrape.
        """
        own = observe.PROCESS_METRICS.snapshot()
        gauges = observe.process_gauges(self._runtime.usage)
        circuits = self._circuits()
        stored = await self._stored.read()
        directory = settings.TOLLGATE_METRICS_DIR
        return await asyncio.to_thread(
            scrape_render, own, gauges, circuits, stored, Path(directory) if directory else None
        )

    def _circuits(self) -> dict[str, CircuitState]:
        """Every configured deployment's breaker (closed until this process saw it fail)."""
        names: dict[int, str] = {}
        for plan in self._runtime.snapshot.routes.values():
            for deployment in (*plan.deployments, plan.variant, plan.shadow):
                if deployment is not None:
                    names[deployment.deployment_id] = deployment.name
        states = dict.fromkeys(names.values(), CircuitState.CLOSED)
        for status in self._runtime.health.statuses(time.monotonic()):
            name = names.get(status.deployment_id)
            if name is not None and _STATE_RANK[status.state] > _STATE_RANK[states[name]]:
                states[name] = status.state
        return states
