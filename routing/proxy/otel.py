"""The OpenTelemetry side of the proxy's traces: the tracer provider, and one request's spans.

Imported only when tracing is on (`routing.proxy.tracing`). Each proxied request
is one SERVER span, named `{gen_ai.operation.name} {gen_ai.request.model}` (e.g.
`chat gpt-4o-mini`; `GET /v1/models` for the endpoints that are not GenAI
operations), the child of the client's W3C `traceparent` if it sent one. Each
upstream attempt is one CLIENT span under it, named after the model asked of the
provider; its context goes upstream in `traceparent`. Attributes follow the GenAI
semantic conventions; Tollgate's own are under `tollgate.`. Token counts and the
answer's details are on the request's span only, so backends that sum them over
spans count each request once. Prompts, completions, end-user ids and keys are
never recorded: only the key's visible prefix.
"""

import functools
import logging
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any
from urllib.parse import urlsplit

import orjson
from opentelemetry.propagators.textmap import Getter
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, set_span_in_context
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from billing.contracts import UsageRecord
from billing.models import UsageEvent
from routing.contracts import DeploymentSpec, RoutePlan
from routing.errors import GatewayError, UpstreamRateLimited, UpstreamRejected
from routing.proxy.http import Message, ProxyRequest, Receive, Scope, Send
from routing.proxy.tracing import REQUEST_TRACE

logger = logging.getLogger(__name__)

App = Callable[[Scope, Receive, Send], Awaitable[None]]

DEFAULT_SERVICE_NAME = "tollgate"
# GenAI operation of each proxy endpoint; the others are plain HTTP spans.
_OPERATIONS = {
    "/v1/chat/completions": "chat",
    "/v1/messages": "chat",
    "/v1/embeddings": "embeddings",
}
_ROUTES = frozenset({*_OPERATIONS, "/v1/models", "/v1/key/info"})
_MODEL_PATH = "/v1/models/"
# Provider kinds as the GenAI conventions name them; other kinds go by their own name.
_PROVIDER_NAMES = {
    "openai": "openai",
    "azure": "azure.ai.openai",
    "anthropic": "anthropic",
    "gemini": "gcp.gemini",
    "groq": "groq",
    "mistral": "mistral_ai",
    "deepseek": "deepseek",
}
# Client-chosen strings (model names, paths) are cut to this in attributes and names.
_MAX_TEXT = 256
# Bodies are parsed for request parameters and response details only up to this size.
_MAX_PARSED_BODY = 64 * 1024


def _resource() -> Resource:
    """OTEL_RESOURCE_ATTRIBUTES and OTEL_SERVICE_NAME (by the SDK), service name `tollgate`
    unless they name one."""
    detected = Resource.create()
    if str(detected.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        return detected.merge(Resource({SERVICE_NAME: DEFAULT_SERVICE_NAME}))
    return detected


def _exporter(name: str) -> SpanExporter | None:
    """The span exporter `name` (OTEL_TRACES_EXPORTER) stands for, or None if unknown."""
    if name in ("otlp", "otlp_proto_http"):
        protocol = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or os.environ.get(
            "OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"
        )
        if protocol.strip() != "http/protobuf":
            logger.warning(
                "OTLP protocol %r is not installed; exporting traces over http/protobuf", protocol
            )
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter()  # endpoint, headers, timeout, TLS: OTEL_EXPORTER_OTLP_*
    if name == "console":
        return ConsoleSpanExporter()
    logger.warning("Unknown OTEL_TRACES_EXPORTER %r ignored (known: otlp, console, none)", name)
    return None


class _ASGIHeaders(Getter[Sequence[tuple[bytes, bytes]]]):
    """Reads `traceparent`/`tracestate` from an ASGI scope's raw headers (names lower-case)."""

    def get(self, carrier: Sequence[tuple[bytes, bytes]], key: str) -> list[str] | None:
        name = key.encode("latin-1")
        values = [value.decode("latin-1") for header, value in carrier if header == name]
        return values or None

    def keys(self, carrier: Sequence[tuple[bytes, bytes]]) -> list[str]:
        return [header.decode("latin-1") for header, _ in carrier]


_ASGI_HEADERS = _ASGIHeaders()


class Tracing:
    """This process's tracer provider, and the proxy's tracer and W3C propagator."""

    def __init__(self, provider: TracerProvider) -> None:
        self._provider = provider
        self.tracer = provider.get_tracer("tollgate.proxy")
        # W3C trace context only: client baggage is not forwarded to providers.
        self.propagator = TraceContextTextMapPropagator()

    @classmethod
    def from_environment(cls, exporter_names: list[str]) -> "Tracing | None":
        """A provider exporting through `exporter_names`, batched; None if none is usable.

        The SDK reads the sampler (OTEL_TRACES_SAMPLER[_ARG]), span limits, the
        resource (OTEL_RESOURCE_ATTRIBUTES, OTEL_SERVICE_NAME) and the batching
        (OTEL_BSP_*) from the environment itself.
        """
        exporters = {name: exporter for name in exporter_names if (exporter := _exporter(name))}
        if not exporters:
            return None
        provider = TracerProvider(resource=_resource())
        for exporter in exporters.values():
            provider.add_span_processor(BatchSpanProcessor(exporter))
        logger.info("Tracing on: /v1 request spans exported to %s", ", ".join(exporters))
        return cls(provider)

    def shutdown(self) -> None:
        """Export the spans still queued, then stop (blocking: bounded by the exporter's
        timeout, OTEL_EXPORTER_OTLP_TIMEOUT)."""
        self._provider.shutdown()

    async def serve(self, app: App, scope: Scope, receive: Receive, send: Send) -> None:
        """Run `app` for one request inside the request's SERVER span."""
        trace = RequestTrace(self, scope)
        token = REQUEST_TRACE.set(trace)

        async def send_noted(message: Message) -> None:
            trace.response_message(message)
            await send(message)

        try:
            await app(scope, receive, send_noted)
        finally:
            REQUEST_TRACE.reset(token)
            trace.end()


@functools.lru_cache(maxsize=512)
def _server_of(base_url: str) -> tuple[str, int | None]:
    """`server.address` and `server.port` of a deployment's base URL."""
    try:
        parts = urlsplit(base_url)
        port = parts.port
    except ValueError:
        return "", None
    if port is None:
        port = {"https": 443, "http": 80}.get(parts.scheme)
    return parts.hostname or "", port


def _text(value: str) -> str:
    return value if len(value) <= _MAX_TEXT else value[:_MAX_TEXT]


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _request_parameters(body: bytes) -> dict[str, Any]:
    """`gen_ai.request.*` parameters of a chat body (OpenAI or Anthropic format), if small."""
    if len(body) > _MAX_PARSED_BODY:
        return {}
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        return {}
    if not isinstance(payload, dict):
        return {}
    attributes: dict[str, Any] = {}
    max_tokens = payload.get("max_completion_tokens") or payload.get("max_tokens")
    if isinstance(max_tokens, int) and not isinstance(max_tokens, bool):
        attributes["gen_ai.request.max_tokens"] = max_tokens
    for name in ("temperature", "top_p"):
        if _number(payload.get(name)):
            attributes[f"gen_ai.request.{name}"] = float(payload[name])
    choices = payload.get("n")
    if isinstance(choices, int) and not isinstance(choices, bool) and choices != 1:
        attributes["gen_ai.request.choice.count"] = choices
    return attributes


def _response_details(body: bytes) -> dict[str, Any]:
    """`gen_ai.response.*` of a complete answer (OpenAI or Anthropic format), if small."""
    if len(body) > _MAX_PARSED_BODY:
        return {}
    try:
        answer = orjson.loads(body)
    except orjson.JSONDecodeError:
        return {}
    if not isinstance(answer, dict):
        return {}
    attributes: dict[str, Any] = {}
    if isinstance(answer.get("model"), str):
        attributes["gen_ai.response.model"] = _text(answer["model"])
    if isinstance(answer.get("id"), str):
        attributes["gen_ai.response.id"] = _text(answer["id"])
    choices = answer.get("choices")
    reasons = [
        choice["finish_reason"]
        for choice in (choices if isinstance(choices, list) else [])
        if isinstance(choice, dict) and isinstance(choice.get("finish_reason"), str)
    ]
    if isinstance(answer.get("stop_reason"), str):  # Anthropic's Messages format
        reasons.append(answer["stop_reason"])
    if reasons:
        attributes["gen_ai.response.finish_reasons"] = [_text(reason) for reason in reasons]
    return attributes


def _error_code(body: bytes) -> str | None:
    """The `error.code` of an OpenAI-shaped error body (or Anthropic's `error.type`)."""
    if len(body) > _MAX_PARSED_BODY:
        return None
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    error = parsed.get("error") if isinstance(parsed, dict) else None
    if not isinstance(error, dict):
        return None
    code = error.get("code") if "code" in error else error.get("type")
    return _text(code) if isinstance(code, str) and code else None


def _is_fallback(deployment: DeploymentSpec, route: RoutePlan) -> bool:
    """Whether `deployment` serves one of the route's fallback models, not the route itself."""
    if route.variant is not None and route.variant.deployment_id == deployment.deployment_id:
        return False
    return all(own.deployment_id != deployment.deployment_id for own in route.deployments)


def _upstream_status(exc: GatewayError) -> int | None:
    """The provider's HTTP status, where the error class tells it."""
    if isinstance(exc, UpstreamRateLimited | UpstreamRejected):
        return exc.status
    return None


class RequestTrace:
    """The spans of one proxied request: its SERVER span, and a CLIENT span per upstream
    attempt. Fed by the ASGI app (status), the request's meter (what it did) and the
    adapters (the upstream call); every method runs on the request's own task."""

    __slots__ = (
        "_attempt",
        "_attempt_began",
        "_attempts",
        "_began",
        "_error_type",
        "_operation",
        "_recording",
        "_request",
        "_response_status",
        "_span",
        "_status_error",
        "_tracing",
        "_tried",
        "request_id",
    )

    def __init__(self, tracing: Tracing, scope: Scope) -> None:
        self._tracing = tracing
        self._began = time.monotonic()
        raw_path = scope["path"]
        path = raw_path.rstrip("/") or raw_path
        method = scope["method"]
        self._operation = _OPERATIONS.get(path)
        attributes: dict[str, Any] = {"http.request.method": method}
        if self._operation is not None:
            attributes["gen_ai.operation.name"] = self._operation
            attributes["url.path"] = raw_path
            name = self._operation
        elif path in _ROUTES or path.startswith(_MODEL_PATH):
            route = path if path in _ROUTES else _MODEL_PATH + "{model}"
            attributes["http.route"] = route
            attributes["url.path"] = _text(raw_path)
            name = f"{method} {route}"
        else:
            # An unknown URL (a 404): its path is anything a client typed, so it is not kept.
            name = method
        parent = tracing.propagator.extract(scope["headers"], getter=_ASGI_HEADERS)
        self._span: Span = tracing.tracer.start_span(
            name, context=parent, kind=SpanKind.SERVER, attributes=attributes
        )
        self._recording = self._span.is_recording()
        self._request: ProxyRequest | None = None
        self.request_id = ""
        self._attempt: Span | None = None
        self._attempt_began = 0.0
        self._attempts = 0
        self._tried: list[int] = []
        self._response_status = 0
        self._error_type: str | None = None
        self._status_error = False

    # The ASGI side.

    def response_message(self, message: Message) -> None:
        """Note the response's status and request id, and an error's code, as they are sent."""
        kind = message["type"]
        if kind == "http.response.start":
            self._response_status = message["status"]
            for name, value in message.get("headers", ()):
                if name == b"x-request-id":
                    self.request_id = value.decode("latin-1")
        elif (
            kind == "http.response.body"
            and self._response_status >= 400
            and self._error_type is None
            and self._recording
        ):
            self._error_type = _error_code(message.get("body", b""))

    def end(self) -> None:
        """End the request's span (and an attempt left open by an unexpected failure)."""
        if self._attempt is not None:
            self._end_attempt(error_type=self._error_type or "_OTHER", failed=True)
        span = self._span
        status = self._response_status
        if self._recording:
            attributes: dict[str, Any] = {}
            if self.request_id:
                attributes["tollgate.request.id"] = self.request_id
            if status:
                attributes["http.response.status_code"] = status
            error_type = self._error_type
            if error_type is None and (status >= 400 or not status):
                error_type = str(status) if status else "client_disconnected"
            if error_type:
                attributes["error.type"] = error_type
            span.set_attributes(attributes)
            # A server span fails on a 5xx, or when the provider broke a stream already
            # answered with 200; a 4xx is the client's (or its limits') doing.
            if status >= 500 or (self._status_error and 0 < status < 400):
                span.set_status(Status(StatusCode.ERROR, error_type))
        span.end()

    # The meter's side.

    def claim(self, request: ProxyRequest) -> bool:
        """Whether `request` is this trace's: the first one metered. A copy made for
        shadow traffic is not, and is not traced."""
        if self._request is None:
            self._request = request
            self.request_id = request.request_id
            return True
        return self._request is request

    def attempt_started(self, deployment: DeploymentSpec, route: RoutePlan | None) -> None:
        """An upstream call to `deployment` begins: its CLIENT span starts."""
        if self._attempt is not None:  # not closed by its failure: superseded
            self._end_attempt(error_type="_OTHER", failed=True)
        self._attempts += 1
        self._attempt_began = time.monotonic()
        parent = set_span_in_context(self._span)
        if not self._recording:
            # Sampled out: the span only gives the upstream call its own context.
            self._attempt = self._tracing.tracer.start_span(
                "upstream", context=parent, kind=SpanKind.CLIENT
            )
            return
        operation = self._operation or "chat"
        address, port = _server_of(deployment.base_url)
        attributes: dict[str, Any] = {
            "gen_ai.operation.name": operation,
            "gen_ai.provider.name": _PROVIDER_NAMES.get(
                deployment.provider_kind, deployment.provider_kind
            ),
            "gen_ai.request.model": _text(deployment.upstream_model),
            "server.address": address,
            "tollgate.deployment.name": deployment.name,
            "tollgate.attempt": self._attempts,
        }
        if port is not None:
            attributes["server.port"] = port
        # Markers are set only when true, as few attributes as possible (each is exported).
        if deployment.deployment_id in self._tried:
            attributes["tollgate.attempt.retry"] = True
        self._tried.append(deployment.deployment_id)
        if route is not None and _is_fallback(deployment, route):
            attributes["tollgate.attempt.fallback"] = True
        self._attempt = self._tracing.tracer.start_span(
            f"{operation} {_text(deployment.upstream_model)}",
            context=parent,
            kind=SpanKind.CLIENT,
            attributes=attributes,
        )

    def attempt_failed(self, exc: GatewayError) -> None:
        """The current attempt failed and the request moves on to another."""
        if self._attempt is not None:
            status = _upstream_status(exc)
            if status is not None:
                self._attempt.set_attribute("http.response.status_code", status)
            self._end_attempt(error_type=exc.code or type(exc).__name__, failed=True)

    def first_chunk(self) -> None:
        """The first bytes of a stream went to the client."""
        if not self._recording:
            return
        now = time.monotonic()
        self._span.set_attribute("gen_ai.response.time_to_first_chunk", now - self._began)
        self._span.add_event("gen_ai.first_chunk")
        if self._attempt is not None:
            self._attempt.set_attribute(
                "gen_ai.response.time_to_first_chunk", now - self._attempt_began
            )

    def response_body(self, body: bytes) -> None:
        """The complete answer the client gets: its model, id and finish reasons."""
        if self._recording:
            self._span.set_attributes(_response_details(body))

    def recorded(self, record: UsageRecord, *, key_prefix: str, route: RoutePlan | None) -> None:
        """The request's usage event: what it was, what it cost, how it ended. Ends the
        attempt still open (the one that answered, or whose failure ended the request)."""
        failed = record.outcome != UsageEvent.Outcome.SUCCESS
        error_type = (record.error_class or str(record.status_code)) if failed else None
        if self._attempt is not None:
            if not failed:
                self._attempt.set_attribute("http.response.status_code", 200)
            self._end_attempt(error_type=error_type, failed=failed)
        self._error_type = error_type
        self._status_error = record.outcome == UsageEvent.Outcome.UPSTREAM_ERROR
        if not self._recording:
            return
        span = self._span
        if self._operation is not None and record.model:
            span.update_name(f"{self._operation} {_text(record.model)}")
        usage = record.usage
        attributes: dict[str, Any] = {
            "tollgate.org.id": record.org_id,
            "tollgate.key.prefix": key_prefix,
            "tollgate.outcome": record.outcome,
            "tollgate.attempt.count": record.attempts,
            "tollgate.cache.hit": record.cache_hit,
            "tollgate.cost_nanos": record.cost_nanos,
        }
        if record.model:
            attributes["gen_ai.request.model"] = _text(record.model)
        if route is not None:
            attributes["tollgate.route"] = route.model_name
        if record.deployment_name:
            attributes["tollgate.deployment.name"] = record.deployment_name
        if record.provider_kind:
            provider = _PROVIDER_NAMES.get(record.provider_kind, record.provider_kind)
            attributes["gen_ai.provider.name"] = provider
        if record.is_stream:
            attributes["gen_ai.request.stream"] = True
        if not usage.is_zero:
            attributes["gen_ai.usage.input_tokens"] = usage.input_tokens
            attributes["gen_ai.usage.output_tokens"] = usage.output_tokens
            if usage.cached_input_tokens:
                attributes["gen_ai.usage.cache_read.input_tokens"] = usage.cached_input_tokens
            if usage.reasoning_tokens:
                attributes["gen_ai.usage.reasoning.output_tokens"] = usage.reasoning_tokens
            if usage.estimated:
                attributes["tollgate.usage.estimated"] = True
        if self._operation == "chat" and self._request is not None:
            attributes.update(_request_parameters(self._request.body))
        span.set_attributes(attributes)

    def _end_attempt(self, *, error_type: str | None, failed: bool) -> None:
        attempt = self._attempt
        assert attempt is not None
        self._attempt = None
        if error_type:
            attempt.set_attribute("error.type", error_type)
        if failed:
            attempt.set_status(Status(StatusCode.ERROR, error_type))
        attempt.end()

    # The adapters' side.

    def inject_upstream(self, headers: dict[str, str], *, request_id: str) -> None:
        """Add the current attempt's `traceparent` (and `tracestate`) to an upstream call's
        headers, if the call is this request's (not a shadow copy's)."""
        if self._attempt is not None and request_id == self.request_id:
            self._tracing.propagator.inject(headers, context=set_span_in_context(self._attempt))
