"""What the proxy notes about each request: Prometheus counters and the access log.

`request_finished` runs once per /v1 request, on the event loop, after the answer
went out. It only adds to plain dicts of this process (`PROCESS_METRICS`): no lock,
no I/O, no string formatting unless the access log is on. Building the exposition
happens at scrape time (`gatewaysite/metrics.py`).

Several worker processes: each one writes its cumulative counters to its own
snapshot file in TOLLGATE_METRICS_DIR every TOLLGATE_METRICS_FLUSH_SECONDS (and at
shutdown), atomically (write, then rename), so a reader always sees a whole,
consistent snapshot of a process: bucket counts, sums and counts of a histogram
agree. The process that answers a scrape adds its own live counters to the other
processes' files, so what it serves is at most one flush interval behind for the
others. Files of workers that exited stay and keep counting (a counter never goes
backwards when a worker dies); `bin/run-process web` clears the directory at start.

Label values are bounded: endpoint names are fixed, routes and deployments are the
configured ones (a model no route serves is `other`, never the client's string),
error classes are the gateway's own codes.
"""

import asyncio
import contextlib
import logging
import os
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Mapping
from contextvars import ContextVar
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
from django.conf import settings

from billing.models import UsageEvent
from billing.stream import UsageSink, UsageStreamProducer

if TYPE_CHECKING:
    from routing.proxy.metering import Meter

logger = logging.getLogger(__name__)
access_logger = logging.getLogger("tollgate.access")

# Seconds; the upper bounds of the histogram buckets (+Inf is implied).
LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                     120.0, 300.0)  # fmt: skip
TTFT_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

NONE = "none"  # no route or deployment (refused before routing, or a cache hit)
OTHER = "other"  # a model or path no configuration names

SUCCESS = UsageEvent.Outcome.SUCCESS.value
CLIENT_ERROR = UsageEvent.Outcome.CLIENT_ERROR.value
BLOCKED = UsageEvent.Outcome.BLOCKED.value
UPSTREAM_ERROR = UsageEvent.Outcome.UPSTREAM_ERROR.value
# A failure of the gateway itself (an unhandled error): no usage event tells it.
GATEWAY_ERROR = "gateway_error"
CLIENT_DISCONNECTED = 499

# Endpoint names by path, as the meter names them (the same labels with or without a key).
_ENDPOINTS = {
    "/v1/chat/completions": "chat.completions",
    "/v1/embeddings": "embeddings",
    "/v1/models": "models",
    "/v1/messages": "messages",
    "/v1/key/info": "key.info",
}
# Classes that tell a provider's answer (not a request refused by the gateway itself).
_PROVIDER_ERROR_CLASSES = frozenset({"content_filter"})
_CACHE_RESULTS = frozenset({"hit", "miss", "bypass"})
SNAPSHOT_VERSION = 1
SNAPSHOT_PREFIX = "web-"
SNAPSHOT_SUFFIX = ".json"

# The meter of the request being served, set by `Meter` itself; each request runs
# in its own task, so in its own context (a shadow call's meter stays in its task).
_current_meter: ContextVar["Meter | None"] = ContextVar("tollgate_current_meter", default=None)


class Histogram:
    """Counts per bucket (not cumulative; the last one is +Inf) and the sum of values."""

    __slots__ = ("counts", "sum")

    def __init__(self, size: int) -> None:
        self.counts = [0] * (size + 1)
        self.sum = 0.0


class ProxyMetrics:
    """One process's cumulative counters, keyed by label tuples. Event loop only."""

    __slots__ = (
        "cache",
        "fallbacks",
        "latency",
        "requests",
        "tokens",
        "ttft",
        "upstream_attempts",
        "upstream_errors",
    )

    def __init__(self) -> None:
        # (endpoint, route, deployment, status code, outcome) -> requests
        self.requests: dict[tuple[str, str, str, int, str], int] = {}
        # (route, deployment) -> histogram of seconds
        self.latency: dict[tuple[str, str], Histogram] = {}
        self.ttft: dict[tuple[str, str], Histogram] = {}
        # (route, deployment) -> [input tokens, output tokens]
        self.tokens: dict[tuple[str, str], list[int]] = {}
        self.upstream_attempts: dict[str, int] = {}  # deployment -> calls
        self.upstream_errors: dict[tuple[str, str], int] = {}  # (deployment, error class)
        # (route, serving deployment, "deployment" or "route") -> requests
        self.fallbacks: dict[tuple[str, str, str], int] = {}
        self.cache: dict[tuple[str, str], int] = {}  # (route, hit/miss/bypass) -> requests

    # -- the file format ---------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """The counters as JSON-ready lists (label values first, then the numbers): a
        copy, which later requests do not change."""
        return {
            "latency_buckets": LATENCY_BUCKETS_S,
            "ttft_buckets": TTFT_BUCKETS_S,
            "requests": [[*labels, count] for labels, count in self.requests.items()],
            "latency": [[*labels, [*h.counts], h.sum] for labels, h in self.latency.items()],
            "ttft": [[*labels, [*h.counts], h.sum] for labels, h in self.ttft.items()],
            "tokens": [[*labels, *pair] for labels, pair in self.tokens.items()],
            "upstream_attempts": [[name, count] for name, count in self.upstream_attempts.items()],
            "upstream_errors": [[*labels, count] for labels, count in self.upstream_errors.items()],
            "fallbacks": [[*labels, count] for labels, count in self.fallbacks.items()],
            "cache": [[*labels, count] for labels, count in self.cache.items()],
        }

    def add_snapshot(self, data: Mapping[str, Any]) -> None:
        """Add another process's `snapshot()` to these counters.

        Raises ValueError (or TypeError) for anything malformed, before changing
        anything it cannot read; histograms with other bucket bounds (a deploy in
        progress) are skipped.
        """
        requests = [(_labels(row, 3) + (_count(row[3]), *_labels(row[4:], 1)), _count(row[5]))
                    for row in data["requests"]]  # fmt: skip
        tokens = [(_labels(row, 2), (_count(row[2]), _count(row[3]))) for row in data["tokens"]]
        attempts = [(str(row[0]), _count(row[1])) for row in data["upstream_attempts"]]
        errors = [(_labels(row, 2), _count(row[2])) for row in data["upstream_errors"]]
        fallbacks = [(_labels(row, 3), _count(row[3])) for row in data["fallbacks"]]
        cache = [(_labels(row, 2), _count(row[2])) for row in data["cache"]]
        histograms = []
        for name, bounds in (("latency", LATENCY_BUCKETS_S), ("ttft", TTFT_BUCKETS_S)):
            if tuple(data[f"{name}_buckets"]) != bounds:
                continue
            rows = [(_labels(row, 2), [_count(c) for c in row[2]], float(row[3]))
                    for row in data[name]]  # fmt: skip
            if any(len(counts) != len(bounds) + 1 for _, counts, _ in rows):
                raise ValueError(f"{name}: wrong number of buckets")
            histograms.append((getattr(self, name), len(bounds), rows))
        for key, count in requests:
            self.requests[key] = self.requests.get(key, 0) + count  # type: ignore[index]
        for key, (input_tokens, output_tokens) in tokens:
            pair = self.tokens.setdefault(key, [0, 0])  # type: ignore[arg-type]
            pair[0] += input_tokens
            pair[1] += output_tokens
        for name, count in attempts:
            self.upstream_attempts[name] = self.upstream_attempts.get(name, 0) + count
        _add_counts(self.upstream_errors, errors)
        _add_counts(self.fallbacks, fallbacks)
        _add_counts(self.cache, cache)
        for into, size, rows in histograms:
            for key, counts, total in rows:
                histogram = into.get(key)
                if histogram is None:
                    histogram = into[key] = Histogram(size)
                histogram.counts = [a + b for a, b in zip(histogram.counts, counts, strict=True)]
                histogram.sum += total

    def merge(self, other: "ProxyMetrics") -> None:
        """Add another process's counters to these."""
        self.add_snapshot(other.snapshot())

    def copy(self) -> "ProxyMetrics":
        merged = ProxyMetrics()
        merged.merge(self)
        return merged


def _labels(row: list[Any], size: int) -> tuple[str, ...]:
    values = tuple(row[:size])
    if len(values) != size or not all(isinstance(value, str) for value in values):
        raise ValueError("label values must be strings")
    return values


def _count(value: object) -> int:
    if type(value) is not int or value < 0:
        raise ValueError("counts must be non-negative integers")
    return value


def _add_counts(into: dict[Any, int], rows: Iterable[tuple[Any, int]]) -> None:
    for key, count in rows:
        into[key] = into.get(key, 0) + count


# The counters of this process (one proxy per process).
PROCESS_METRICS = ProxyMetrics()


# ---------------------------------------------------------------- the request path


def meter_opened(meter: "Meter") -> None:
    """The request being served has this meter (called by `Meter` itself)."""
    _current_meter.set(meter)


def request_started() -> float:
    """Forget any earlier request's meter; the start time for `request_finished`."""
    _current_meter.set(None)
    return time.monotonic()


def endpoint_of(path: str) -> str:
    """The endpoint label of a /v1 path: one of the proxy's endpoints, else `other`."""
    endpoint = _ENDPOINTS.get(path)
    if endpoint is None:
        path = path.rstrip("/")
        endpoint = _ENDPOINTS.get(path) or ("models" if path.startswith("/v1/models/") else OTHER)
    return endpoint


def _outcome_of_status(status: int) -> str:
    if status < 400:
        return SUCCESS
    if status == 429:
        return BLOCKED
    return CLIENT_ERROR if status < 500 else GATEWAY_ERROR


def _is_provider_error(outcome: str, error_class: str) -> bool:
    """Whether an upstream call failed at the provider (not refused by the gateway first)."""
    return (
        outcome == UPSTREAM_ERROR
        or error_class.startswith("upstream_")
        or error_class in _PROVIDER_ERROR_CLASSES
    )


def _observe(histograms: dict[tuple[str, str], Histogram], key: tuple[str, str],
             bounds: tuple[float, ...], value: float) -> None:  # fmt: skip
    histogram = histograms.get(key)
    if histogram is None:
        histogram = histograms[key] = Histogram(len(bounds))
    histogram.counts[bisect_left(bounds, value)] += 1
    histogram.sum += value


def request_finished(
    scope: Mapping[str, Any],
    *,
    request_id: str | None,
    status: int,
    headers: Mapping[str, str],
    started: float,
    metrics: ProxyMetrics = PROCESS_METRICS,
) -> None:
    """Count a /v1 request once its answer went out (a stream: once it ended), and log it.

    `status` and `headers` are what the client was sent; for a request that got as
    far as a usage event, its status and outcome are the event's (a stream cut by
    the client counts as 499, one broken by the provider as the provider's error).
    """
    elapsed_s = time.monotonic() - started
    path = scope["path"]
    meter = _current_meter.get()
    record = meter.usage_record if meter is not None else None
    if record is not None:
        assert meter is not None
        endpoint = record.endpoint
        plan = meter.route
        if plan is not None:
            route = plan.model_name
        else:  # a model no route serves; listing models routes nothing
            route = OTHER if record.model and endpoint != "models" else NONE
        deployment = record.deployment_name or NONE
        status, outcome = record.status_code, record.outcome
    else:
        endpoint, route, deployment = endpoint_of(path), NONE, NONE
        outcome = _outcome_of_status(status)
    key = (endpoint, route, deployment, status, outcome)
    requests = metrics.requests
    requests[key] = requests.get(key, 0) + 1
    pair = (route, deployment)
    _observe(metrics.latency, pair, LATENCY_BUCKETS_S, elapsed_s)
    cache = headers.get("x-tollgate-cache")
    if cache in _CACHE_RESULTS:
        cache_key = (route, cache)
        metrics.cache[cache_key] = metrics.cache.get(cache_key, 0) + 1
    if record is not None:
        if record.ttft_ms is not None:
            _observe(metrics.ttft, pair, TTFT_BUCKETS_S, record.ttft_ms / 1000)
        usage = record.usage
        if usage.input_tokens or usage.output_tokens:
            tokens = metrics.tokens.get(pair)
            if tokens is None:
                tokens = metrics.tokens[pair] = [0, 0]
            tokens[0] += usage.input_tokens
            tokens[1] += usage.output_tokens
        if record.attempt_log:
            _count_attempts(metrics, record.attempt_log, route, outcome, meter)
    if access_logger.isEnabledFor(logging.INFO):
        _log_access(scope, request_id, status, outcome, endpoint, route, cache, elapsed_s,
                    meter, record)  # fmt: skip


def _count_attempts(
    metrics: ProxyMetrics, attempts: Any, route: str, outcome: str, meter: "Meter | None"
) -> None:
    counts, errors = metrics.upstream_attempts, metrics.upstream_errors
    for attempt in attempts:
        name = attempt.deployment_name
        counts[name] = counts.get(name, 0) + 1
        if attempt.outcome != SUCCESS and _is_provider_error(attempt.outcome, attempt.error_class):
            error_key = (name, attempt.error_class or OTHER)
            errors[error_key] = errors.get(error_key, 0) + 1
    first, served = attempts[0], attempts[-1]
    if outcome == SUCCESS and served.deployment_id != first.deployment_id:
        plan = meter.route if meter is not None else None
        own = plan is not None and (
            any(d.deployment_id == served.deployment_id for d in plan.deployments)
            or (plan.variant is not None and plan.variant.deployment_id == served.deployment_id)
        )
        fallback_key = (route, served.deployment_name, "deployment" if own else "route")
        metrics.fallbacks[fallback_key] = metrics.fallbacks.get(fallback_key, 0) + 1


def _usd(nanos: int) -> str:
    """Exact USD text of an amount in nano-USD (no float, no Decimal on the hot path)."""
    sign, nanos = ("-", -nanos) if nanos < 0 else ("", nanos)
    return f"{sign}{nanos // 1_000_000_000}.{nanos % 1_000_000_000:09d}"


def _log_access(
    scope: Mapping[str, Any], request_id: str | None, status: int, outcome: str, endpoint: str,
    route: str, cache: str | None, elapsed_s: float, meter: "Meter | None", record: Any,
) -> None:  # fmt: skip
    """One JSON line on `tollgate.access`: never a body, a header or a secret."""
    client = scope.get("client")
    line: dict[str, Any] = {
        "source": "proxy",
        "request_id": request_id,
        "method": scope["method"],
        "path": scope["path"],
        "endpoint": endpoint,
        "status": status,
        "outcome": outcome,
        "latency_ms": round(elapsed_s * 1000, 1),
        "client": client[0] if client else None,
    }
    if meter is not None:
        key = meter.key
        line["org_id"] = key.org_id
        line["org"] = key.org_slug
        line["team_id"] = key.team_id
        line["key_prefix"] = key.prefix
        line["model"] = meter.model or None
        line["route"] = route if route != NONE else None
    if record is not None:
        usage = record.usage
        line.update(
            deployment=record.deployment_name or None,
            provider=record.provider_kind or None,
            error=record.error_class or None,
            input_tokens=usage.input_tokens,
            output_tokens=usage.output_tokens,
            cost_usd=_usd(record.cost_nanos),
            ttft_ms=record.ttft_ms,
            attempts=record.attempts,
            cache_hit=record.cache_hit,
            stream=record.is_stream,
        )
    if cache is not None:
        line["cache"] = cache
    # Not `access_logger.info`: it would spend as long again finding the caller's
    # frame, which an access line has no use for. Handlers and filters apply alike.
    access_logger.handle(
        access_logger.makeRecord(
            access_logger.name, logging.INFO, "", 0, orjson.dumps(line).decode(), None, None
        )
    )


# ---------------------------------------------------------------- files, for several workers

USAGE_BUFFERED = "usage_buffered_events"
USAGE_SPOOLED = "usage_spooled_events"


def process_gauges(usage: UsageSink) -> dict[str, float]:
    """This process's own gauges, summed over the live workers at scrape time."""
    gauges = {USAGE_BUFFERED: float(usage.pending)}
    if isinstance(usage, UsageStreamProducer):
        gauges[USAGE_SPOOLED] = float(usage.spooled)
    return gauges


def snapshot_path(directory: Path, pid: int) -> Path:
    return directory / f"{SNAPSHOT_PREFIX}{pid}{SNAPSHOT_SUFFIX}"


def _write_atomically(path: Path, data: bytes) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_bytes(data)
    os.replace(temporary, path)  # readers see the old file or the new one, never a part


class ProcessSnapshot:
    """What one worker wrote: its counters and its own gauges, and whether it still runs."""

    __slots__ = ("alive", "gauges", "metrics", "pid")

    def __init__(self, pid: int, metrics: ProxyMetrics, gauges: dict[str, float],
                 alive: bool) -> None:  # fmt: skip
        self.pid, self.metrics, self.gauges, self.alive = pid, metrics, gauges, alive


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, under another user
    return True


def read_snapshots(directory: Path, *, skip_pid: int | None = None) -> list[ProcessSnapshot]:
    """Every worker's last snapshot in `directory` but `skip_pid`'s (blocking file reads).

    A file that cannot be read or parsed is logged and left out.
    """
    snapshots = []
    try:
        paths = sorted(directory.glob(f"{SNAPSHOT_PREFIX}*{SNAPSHOT_SUFFIX}"))
    except OSError:
        return []
    for path in paths:
        try:
            data = orjson.loads(path.read_bytes())
            pid = int(data["pid"])
            if pid == skip_pid:
                continue
            if data.get("version") != SNAPSHOT_VERSION:
                raise ValueError(f"unknown version {data.get('version')!r}")
            metrics = ProxyMetrics()
            metrics.add_snapshot(data["metrics"])
            gauges = {str(name): float(value) for name, value in data["gauges"].items()}
        except FileNotFoundError:
            continue  # replaced or cleared meanwhile
        except (OSError, ValueError, TypeError, KeyError, IndexError) as exc:
            logger.warning("Metrics snapshot %s left out: %s", path.name, exc)
            continue
        snapshots.append(ProcessSnapshot(pid, metrics, gauges, _process_alive(pid)))
    return snapshots


def snapshots_start(usage: UsageSink) -> "SnapshotWriter | None":
    """Start writing this process's snapshots if TOLLGATE_METRICS_DIR is set."""
    if not settings.TOLLGATE_METRICS_DIR:
        return None
    writer = SnapshotWriter(
        Path(settings.TOLLGATE_METRICS_DIR),
        interval_s=settings.TOLLGATE_METRICS_FLUSH_SECONDS,
        gauges=lambda: process_gauges(usage),
    )
    writer.start()
    return writer


class SnapshotWriter:
    """Writes this process's counters (and gauges) to its file, every `interval_s`."""

    def __init__(
        self,
        directory: Path,
        *,
        interval_s: float,
        gauges: Callable[[], dict[str, float]],
        metrics: ProxyMetrics = PROCESS_METRICS,
    ) -> None:
        self.directory = directory
        self.path = snapshot_path(directory, os.getpid())
        self._interval_s = interval_s
        self._gauges = gauges
        self._metrics = metrics
        self._task: asyncio.Task[None] | None = None
        self._failing = False  # logged once when writes start failing, once when they recover

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="tollgate-metrics-snapshots")

    async def stop(self) -> None:
        """Stop writing, after a last write: a worker's counts outlive it."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.write()

    async def write(self) -> None:
        # Built on the event loop (one consistent snapshot), written in a thread.
        data = orjson.dumps(
            {
                "version": SNAPSHOT_VERSION,
                "pid": os.getpid(),
                "written_at": time.time(),
                "metrics": self._metrics.snapshot(),
                "gauges": self._gauges(),
            }
        )
        try:
            await asyncio.to_thread(self._write, data)
        except OSError as exc:
            if not self._failing:
                logger.warning("Writing the metrics snapshot %s failed: %s", self.path, exc)
            self._failing = True
            return
        if self._failing:
            logger.info("Writing the metrics snapshot %s works again", self.path)
            self._failing = False

    def _write(self, data: bytes) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        _write_atomically(self.path, data)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            await self.write()
