"""Settling a request into exactly one usage event."""

import time
from collections.abc import Callable, Coroutine, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from billing.bodies import body_log_max_bytes
from billing.budget_counters import BudgetLine, InflightEntry
from billing.contracts import LoggedBodies, TokenUsage, UpstreamAttempt, UsageRecord
from billing.inflight import inflight_payload
from billing.models import UsageEvent
from billing.pricing import cost_nanos
from billing.stream import UsageSink
from routing.contracts import DeploymentSpec, RoutePlan
from routing.errors import GatewayError, LimitExceeded, UpstreamError
from routing.health import DeploymentHealth
from routing.proxy import observe
from routing.proxy.http import ProxyRequest
from routing.proxy.limits import Admission
from routing.proxy.steps import presented_key
from routing.proxy.tracing import current_trace
from routing.snapshot import ConfigSnapshot
from tenants.contracts import KeyContext

if TYPE_CHECKING:
    from routing.proxy.otel import RequestTrace


def outcome_of(exc: GatewayError) -> str:
    """Whose failure it was: the provider's, or the client's (a request nobody could serve)."""
    if isinstance(exc, UpstreamError) and exc.retryable:
        return UsageEvent.Outcome.UPSTREAM_ERROR
    if isinstance(exc, LimitExceeded):
        return UsageEvent.Outcome.BLOCKED
    return UsageEvent.Outcome.CLIENT_ERROR


Background = Callable[[Coroutine[Any, Any, None]], None]

# One upstream call as the hot path notes it: (deployment, began) while it runs or
# answered; (deployment, began, ended, error) once it failed and the request moved on.
AttemptNote = tuple[DeploymentSpec, float] | tuple[DeploymentSpec, float, float, GatewayError]
_REDACTED_KEY = b"[redacted key]"
# Captured past the cap, so a key cut by the cap is still found and redacted whole.
_KEY_SLACK_BYTES = 256


class BodyCapture:
    """The first `max_bytes` of a response, kept for orgs that log bodies."""

    __slots__ = ("_max_bytes", "_parts", "_size", "truncated")

    def __init__(self, max_bytes: int) -> None:
        self._max_bytes = max_bytes
        self._parts: list[bytes] = []
        self._size = 0
        self.truncated = False

    def add(self, chunk: bytes) -> None:
        """Append `chunk`, cut at the cap (a stream's events, as relayed)."""
        room = self._max_bytes - self._size
        if len(chunk) > room:
            self.truncated = True
            chunk = chunk[: max(room, 0)]
        if chunk:
            self._parts.append(chunk)
            self._size += len(chunk)

    def replace(self, body: bytes) -> None:
        """Keep `body` instead of anything added so far (a complete response)."""
        self._parts, self._size, self.truncated = [], 0, False
        self.add(body)

    @property
    def empty(self) -> bool:
        return not self._parts and not self.truncated

    def value(self) -> bytes:
        return b"".join(self._parts)


def _logged_text(raw: bytes, *, secret: bytes | None, max_bytes: int) -> tuple[str, bool]:
    """`raw` as storable text: the caller's key redacted first, then cut to `max_bytes`."""
    truncated = len(raw) > max_bytes
    raw = raw[: max_bytes + _KEY_SLACK_BYTES]
    if secret and secret in raw:
        raw = raw.replace(secret, _REDACTED_KEY)
    # A cut through a UTF-8 sequence, or bytes that are not text, show as U+FFFD;
    # PostgreSQL text cannot hold NUL.
    text = raw[:max_bytes].decode("utf-8", "replace").replace("\x00", "\ufffd")
    return text, truncated


class Meter:
    """What one authenticated request did; `record` emits its usage event once.

    A request admitted on budgets or rate limits is settled on them first, in
    the background (`settle_later`), and its event emitted after: the ledger
    never gets ahead of the counters, which reconciliation relies on.
    """

    def __init__(
        self,
        *,
        request: ProxyRequest,
        key: KeyContext,
        endpoint: str,
        snapshot: ConfigSnapshot,
        sink: UsageSink,
        settle_later: Background,
        health: DeploymentHealth | None = None,
    ) -> None:
        self._request = request
        self._key = key
        self._snapshot = snapshot
        self._sink = sink
        self._health = health  # hears the tokens each deployment used, for TPM limits
        self._settle_later = settle_later
        self._recorded = False
        self.usage_record: UsageRecord | None = None  # the event, once recorded
        observe.meter_opened(self)  # for the request's metrics and access log line
        self.admission: Admission | None = None
        self.endpoint = endpoint
        self.model = ""
        self.is_stream = False
        self.route: RoutePlan | None = None
        self.deployment: DeploymentSpec | None = None
        self.attempts = 0
        self.cache_hit = False
        # (provider kind, upstream model) that prices this request, when no
        # deployment was called (a billed cache hit).
        self.priced_as: tuple[str, str] | None = None
        self.ttft_ms: int | None = None
        self.last_usage = TokenUsage()  # what the recorded event was billed for
        self.tags: tuple[str, ...] = ()  # attribution the client sent (steps.parse_attribution)
        self.end_user = ""
        self._attempt_notes: list[AttemptNote] = []
        self._first_byte_at: float | None = None
        # Only for orgs that log bodies: the hot path checks for None and does nothing else.
        self._body_max_bytes = body_log_max_bytes() if key.log_request_bodies else 0
        self.response_capture: BodyCapture | None = (
            BodyCapture(self._body_max_bytes + _KEY_SLACK_BYTES) if key.log_request_bodies else None
        )
        # Only while tracing is on (routing.proxy.tracing); a shadow copy is not traced.
        trace = current_trace()
        self._trace: RequestTrace | None = trace if trace and trace.claim(request) else None

    @property
    def key(self) -> KeyContext:
        return self._key

    def inflight_entry(self, lines: Sequence[BudgetLine]) -> InflightEntry | None:
        """The write-ahead entry its reserve stores (billing/inflight.py), if its event
        goes to Redis."""
        hash_key = self._sink.inflight_key
        return None if hash_key is None else InflightEntry(hash_key, self._inflight_payload(lines))

    def _inflight_payload(self, lines: Sequence[BudgetLine] = ()) -> bytes:
        """The request as known at admission, as its event would read should its process die."""
        known: dict[str, object] = {
            "org_id": self._key.org_id,
            "team_id": self._key.team_id,
            "key_id": self._key.key_id,
            "endpoint": self.endpoint,
            "model": self.model,
            "started_at": self._request.started_at,
            "route_id": self.route.route_id if self.route else None,
            "is_stream": self.is_stream,
            "tags": self.tags,
            "end_user": self.end_user,
        }
        return inflight_payload(known, lines)

    def serving(self, deployment: DeploymentSpec) -> None:
        """An upstream attempt begins on `deployment`."""
        self.deployment = deployment
        self.attempts += 1
        stored = self.admission is not None and self.admission.inflight_stored
        if self.attempts == 1 and not stored and self._sink.inflight_key:
            # No reserve wrote its in-flight entry (billing/inflight.py): write it now.
            self._sink.begin(self._request.request_id, self._inflight_payload())
        self._attempt_notes.append((deployment, time.monotonic()))
        if self._trace is not None:
            self._trace.attempt_started(deployment, self.route)

    def attempt_failed(self, exc: GatewayError) -> None:
        """The current upstream attempt failed and the request moves on to another."""
        if self._attempt_notes:
            deployment, began = self._attempt_notes[-1][:2]
            self._attempt_notes[-1] = (deployment, began, time.monotonic(), exc)
        if self._trace is not None:
            self._trace.attempt_failed(exc)

    def first_byte_sent(self) -> None:
        if self.ttft_ms is None:
            self._first_byte_at = time.monotonic()
            self.ttft_ms = self._request.elapsed_ms()
            if self._trace is not None:
                self._trace.first_chunk()

    def keep_response(self, body: bytes) -> None:
        """The complete response the client got, for the request log (if the org logs bodies)."""
        if self.response_capture is not None:
            self.response_capture.replace(body)
        if self._trace is not None:
            self._trace.response_body(body)

    def record_failure(self, exc: GatewayError, usage: TokenUsage | None = None) -> None:
        """Record a failed request, with whatever it used before failing."""
        if self.response_capture is not None and self.response_capture.empty:
            self.response_capture.replace(exc.openai_body())
        self.record(
            outcome=outcome_of(exc), status_code=exc.status, usage=usage, error_class=exc.code or ""
        )

    def record(
        self,
        *,
        outcome: str,
        status_code: int,
        usage: TokenUsage | None = None,
        error_class: str = "",
    ) -> None:
        """Price the usage and queue the event; later calls are ignored."""
        if self._recorded:
            return
        self._recorded = True
        usage = self.last_usage = usage or TokenUsage()
        deployment = self.deployment
        priced_as = self.priced_as or (
            (deployment.provider_kind, deployment.upstream_model) if deployment else None
        )
        if self._health is not None and deployment is not None and not usage.is_zero:
            self._health.record_tokens(
                deployment.deployment_id,
                usage.input_tokens + usage.output_tokens,
                time.monotonic(),
            )
        price_id, cost, priced = None, 0, True
        if priced_as is not None and not usage.is_zero:
            rates = self._snapshot.price_for(
                provider_kind=priced_as[0],
                model=priced_as[1],
                org_id=self._key.org_id,
                moment=self._request.started_at,
            )
            if rates is None:
                priced = False  # flagged for finance, never silently free
            else:
                price_id, cost = rates.price_id, cost_nanos(usage=usage, rates=rates)
        finished = time.monotonic()
        record = UsageRecord(
            event_id=self._request.event_id,
            org_id=self._key.org_id,
            team_id=self._key.team_id,
            key_id=self._key.key_id,
            endpoint=self.endpoint,
            model=self.model,
            outcome=outcome,
            status_code=status_code,
            started_at=self._request.started_at,
            finished_at=datetime.now(UTC),
            route_id=self.route.route_id if self.route else None,
            deployment_id=deployment.deployment_id if deployment else None,
            deployment_name=deployment.name if deployment else "",
            provider_kind=deployment.provider_kind if deployment else "",
            upstream_model=deployment.upstream_model if deployment else "",
            usage=usage,
            cost_nanos=cost,
            price_id=price_id,
            priced=priced,
            error_class=error_class,
            cache_hit=self.cache_hit,
            attempts=self.attempts,
            is_stream=self.is_stream,
            latency_ms=self._request.elapsed_ms(),
            ttft_ms=self.ttft_ms,
            tags=self.tags,
            end_user=self.end_user,
            attempt_log=self._attempt_log(
                outcome=outcome, status_code=status_code, error_class=error_class, now=finished
            ),
            bodies=self._logged_bodies() if self.response_capture is not None else None,
        )
        if self._trace is not None:
            self._trace.recorded(record, key_prefix=self._key.prefix, route=self.route)
        self.usage_record = record
        if self.admission is None:
            self._sink.add(record)
            return
        self._settle_later(self._settle_then_emit(self.admission, record))

    def _attempt_log(
        self, *, outcome: str, status_code: int, error_class: str, now: float
    ) -> tuple[UpstreamAttempt, ...]:
        """The attempts for the ledger; one still open when the request ended, ended as it did."""
        origin = self._request.started_monotonic
        attempts = []
        for note in self._attempt_notes:
            deployment, began = note[0], note[1]
            ttfb_ms = None
            if len(note) == 4:
                ended, exc = note[2], note[3]
                ended_as = (outcome_of(exc), exc.status, exc.code or "")
            else:
                ended, ended_as = now, (outcome, status_code, error_class)
                if self._first_byte_at is not None and self._first_byte_at >= began:
                    ttfb_ms = int((self._first_byte_at - began) * 1000)
            attempts.append(
                UpstreamAttempt(
                    deployment_id=deployment.deployment_id,
                    deployment_name=deployment.name,
                    provider_kind=deployment.provider_kind,
                    outcome=ended_as[0],
                    status_code=ended_as[1],
                    error_class=ended_as[2],
                    started_ms=max(int((began - origin) * 1000), 0),
                    duration_ms=max(int((ended - began) * 1000), 0),
                    ttfb_ms=ttfb_ms,
                )
            )
        return tuple(attempts)

    def _logged_bodies(self) -> LoggedBodies:
        """The request and response bodies, capped, with the caller's key redacted."""
        capture = self.response_capture
        assert capture is not None
        presented = presented_key(self._request)
        secret = presented.encode() if presented else None
        max_bytes = self._body_max_bytes
        request, request_cut = _logged_text(self._request.body, secret=secret, max_bytes=max_bytes)
        response, response_cut = _logged_text(capture.value(), secret=secret, max_bytes=max_bytes)
        return LoggedBodies(
            request=request,
            request_truncated=request_cut,
            response=response,
            response_truncated=response_cut or capture.truncated,
        )

    async def _settle_then_emit(self, admission: Admission, record: UsageRecord) -> None:
        usage = record.usage
        try:
            await admission.settle(
                cost_nanos=record.cost_nanos, tokens_used=usage.input_tokens + usage.output_tokens
            )
        finally:
            self._sink.add(record)
