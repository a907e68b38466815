"""OpenTelemetry traces: a real gateway exporting OTLP/HTTP to an in-test receiver.

The client is the official `openai` SDK, the upstream the mock provider (which
records the headers it got, so the propagated `traceparent` can be checked).
"""

import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from urllib.parse import urlsplit

import anthropic
import httpx
import openai
import pytest
from openai import OpenAI

from routing.models import Deployment, Provider, Route
from routing.proxy.tracing import trace_exporters_named
from tenants.models import Organization
from tests.conftest import IssueKey, MakeRoute
from tests.support.gateway import GatewayServer, gateway_server, wait_for_key
from tests.support.otlp import (
    CLIENT,
    SERVER,
    STATUS_ERROR,
    STATUS_UNSET,
    OTLPReceiver,
    ReceivedSpan,
    otlp_receiver,
)
from tests.support.processes import REPO_ROOT

# The gateway processes see only committed rows.
live = pytest.mark.django_db(transaction=True)

PROMPT = "The secret plan is in the blue folder"
MESSAGES = [{"role": "user", "content": PROMPT}]
SERVICE_NAME = "tollgate-traces-test"
# Spans leave the gateway within this long of ending (OTEL_BSP_SCHEDULE_DELAY).
EXPORT_DELAY_MS = 50
# Long enough for an exporter that was (wrongly) on to have sent its spans.
QUIET_S = 1.0


@pytest.fixture(autouse=True)
def no_otel_in_test_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Servers inherit the test run's environment: only the tests decide what OTEL_* says."""
    for name in list(os.environ):
        if name.startswith("OTEL_"):
            monkeypatch.delenv(name)


@pytest.fixture(scope="module")
def otlp() -> Iterator[OTLPReceiver]:
    with otlp_receiver() as receiver:
        yield receiver


@pytest.fixture(scope="module")
def traced_gateway(
    django_db_setup: None, mock_url: str, otlp: OTLPReceiver
) -> Iterator[GatewayServer]:
    """A gateway exporting its traces to `otlp`, every span within EXPORT_DELAY_MS."""
    with gateway_server(
        OTEL_EXPORTER_OTLP_ENDPOINT=otlp.url,
        OTEL_BSP_SCHEDULE_DELAY=str(EXPORT_DELAY_MS),
        OTEL_SERVICE_NAME=SERVICE_NAME,
        OTEL_RESOURCE_ATTRIBUTES="deployment.environment.name=test",
    ) as server:
        yield server


def new_traceparent() -> tuple[str, str, str]:
    """A sampled W3C traceparent for a fresh trace: (header, trace id, parent span id)."""
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{span_id}-01", trace_id, span_id


def traceparent_parts(header: str) -> tuple[str, str, bool]:
    """(trace id, parent span id, sampled) of a version-00 traceparent."""
    version, trace_id, span_id, flags = header.split("-")
    assert version == "00"
    return trace_id, span_id, bool(int(flags, 16) & 1)


def sdk(gateway: GatewayServer, key: str, traceparent: str | None = None) -> OpenAI:
    headers = {"traceparent": traceparent} if traceparent else None
    return OpenAI(base_url=gateway.v1, api_key=key, max_retries=0, default_headers=headers)


def upstream_calls(mock_url: str, request_id: str) -> list[dict]:
    """The calls the mock provider received for the gateway request `request_id`, in order."""
    root = mock_url.removesuffix("/v1")
    calls = httpx.get(f"{root}/_mock/requests", params={"limit": 200}).json()
    return [call for call in calls if call["headers"].get("x-request-id") == request_id]


def request_span(otlp: OTLPReceiver, request_id: str, *, attempts: int) -> ReceivedSpan:
    """The SERVER span of the gateway request `request_id`, once its attempts arrived too."""

    def complete(spans: list[ReceivedSpan]) -> bool:
        server = [s for s in spans if s.attributes.get("tollgate.request.id") == request_id]
        return bool(server) and len(children(spans, server[0])) >= attempts

    spans = otlp.wait_for(complete)
    (server,) = [s for s in spans if s.attributes.get("tollgate.request.id") == request_id]
    return server


def children(spans: list[ReceivedSpan], parent: ReceivedSpan) -> list[ReceivedSpan]:
    """`parent`'s child spans, oldest first."""
    found = [
        s for s in spans if s.parent_span_id == parent.span_id and s.trace_id == parent.trace_id
    ]
    return sorted(found, key=lambda span: span.start_ns)


def everything_recorded(spans: list[ReceivedSpan]) -> str:
    return repr([(span.name, span.attributes, span.events, span.resource) for span in spans])


@live
def test_a_chat_request_is_a_server_span_in_the_clients_trace_with_one_attempt_span(
    traced_gateway: GatewayServer,
    otlp: OTLPReceiver,
    org: Organization,
    make_route: MakeRoute,
    issue_key: IssueKey,
    mock_url: str,
) -> None:
    make_route(model="traced-chat", org=org, upstream_model="traced-chat-upstream")
    key = issue_key(org)
    wait_for_key(traced_gateway, key)
    traceparent, trace_id, client_span_id = new_traceparent()

    raw = sdk(traced_gateway, key, traceparent).chat.completions.with_raw_response.create(
        model="traced-chat", messages=MESSAGES, max_tokens=20, temperature=0.5
    )
    reply = raw.parse()
    request_id = raw.headers["x-request-id"]

    spans = otlp.in_trace(trace_id, count=2)
    (server,) = [span for span in spans if span.kind == SERVER]
    (attempt,) = [span for span in spans if span.kind == CLIENT]
    # The client's trace continues: its span is the parent of the gateway's.
    assert server.parent_span_id == client_span_id
    assert server.name == "chat traced-chat"
    assert server.status_code == STATUS_UNSET
    assert server.attributes == server.attributes | {
        "gen_ai.operation.name": "chat",
        "gen_ai.request.model": "traced-chat",
        "gen_ai.provider.name": "mock",
        "gen_ai.response.model": reply.model,
        "gen_ai.response.id": reply.id,
        "gen_ai.response.finish_reasons": ["stop"],
        "gen_ai.request.max_tokens": 20,
        "gen_ai.request.temperature": 0.5,
        "gen_ai.usage.input_tokens": reply.usage.prompt_tokens,
        "gen_ai.usage.output_tokens": reply.usage.completion_tokens,
        "http.request.method": "POST",
        "http.response.status_code": 200,
        "tollgate.request.id": request_id,
        "tollgate.org.id": org.id,
        "tollgate.key.prefix": key[:12],
        "tollgate.route": "traced-chat",
        "tollgate.deployment.name": "traced-chat-deployment",
        "tollgate.outcome": "success",
        "tollgate.attempt.count": 1,
        "tollgate.cache.hit": False,
    }
    assert "error.type" not in server.attributes
    assert "gen_ai.request.stream" not in server.attributes
    assert server.resource["service.name"] == SERVICE_NAME
    assert server.resource["deployment.environment.name"] == "test"

    assert attempt.parent_span_id == server.span_id
    assert attempt.name == "chat traced-chat-upstream"
    assert attempt.attributes == attempt.attributes | {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "mock",
        "gen_ai.request.model": "traced-chat-upstream",
        "server.address": "127.0.0.1",
        "server.port": urlsplit(mock_url).port,
        "http.response.status_code": 200,
        "tollgate.deployment.name": "traced-chat-deployment",
        "tollgate.attempt": 1,
    }
    # Markers are there only when true; token counts only on the request's span, once.
    assert not {"tollgate.attempt.retry", "tollgate.attempt.fallback"} & set(attempt.attributes)
    assert "gen_ai.usage.input_tokens" not in attempt.attributes
    assert attempt.status_code == STATUS_UNSET
    assert server.start_ns <= attempt.start_ns <= attempt.end_ns <= server.end_ns

    # The provider was called inside the attempt span, and told so.
    (call,) = upstream_calls(mock_url, request_id)
    assert call["headers"]["traceparent"] == f"00-{trace_id}-{attempt.span_id}-01"
    # Neither the prompt, the answer, nor any key is ever recorded.
    recorded = everything_recorded(spans)
    assert PROMPT not in recorded
    assert reply.choices[0].message.content not in recorded
    assert key not in recorded and key[12:] not in recorded
    assert "sk-upstream-secret-for-tests" not in recorded


@live
def test_a_stream_keeps_its_span_open_until_the_last_chunk(
    traced_gateway: GatewayServer,
    otlp: OTLPReceiver,
    org: Organization,
    make_route: MakeRoute,
    issue_key: IssueKey,
) -> None:
    # 16 chunks 25 ms apart: the stream lasts about 0.4 s after its first chunk.
    make_route(model="traced-stream", org=org, upstream_model="traced-stream-up+chunk_delay_ms=25")
    key = issue_key(org)
    wait_for_key(traced_gateway, key)
    traceparent, trace_id, _ = new_traceparent()

    began = time.monotonic()
    stream = sdk(traced_gateway, key, traceparent).chat.completions.create(
        model="traced-stream",
        messages=MESSAGES,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    streamed_s = time.monotonic() - began
    usage = chunks[-1].usage
    assert usage is not None

    spans = otlp.in_trace(trace_id, count=2)
    (server,) = [span for span in spans if span.kind == SERVER]
    (attempt,) = [span for span in spans if span.kind == CLIENT]
    assert server.name == "chat traced-stream"
    assert server.attributes["gen_ai.request.stream"] is True
    assert server.attributes["gen_ai.usage.input_tokens"] == usage.prompt_tokens
    assert server.attributes["gen_ai.usage.output_tokens"] == usage.completion_tokens
    assert server.attributes["tollgate.outcome"] == "success"
    assert "gen_ai.first_chunk" in server.events
    first_chunk_s = server.attributes["gen_ai.response.time_to_first_chunk"]
    assert 0 < first_chunk_s < server.duration_s
    assert 0 < attempt.attributes["gen_ai.response.time_to_first_chunk"] <= first_chunk_s
    # Both spans cover the whole stream, not just its start.
    assert server.duration_s - first_chunk_s >= 0.3
    assert attempt.duration_s >= 0.3
    assert server.duration_s <= streamed_s + 0.5
    assert attempt.end_ns <= server.end_ns


@live
def test_a_stream_the_provider_breaks_midway_is_an_error_span_though_answered_200(
    traced_gateway: GatewayServer,
    otlp: OTLPReceiver,
    org: Organization,
    make_route: MakeRoute,
    issue_key: IssueKey,
) -> None:
    make_route(model="traced-broken", org=org, upstream_model="traced-broken-up+fault=reset")
    key = issue_key(org)
    wait_for_key(traced_gateway, key)
    traceparent, trace_id, _ = new_traceparent()

    stream = sdk(traced_gateway, key, traceparent).chat.completions.create(
        model="traced-broken", messages=MESSAGES, stream=True
    )
    with pytest.raises(openai.APIError):
        list(stream)  # the SDK raises the final error event

    spans = otlp.in_trace(trace_id, count=2)
    (server,) = [span for span in spans if span.kind == SERVER]
    (attempt,) = [span for span in spans if span.kind == CLIENT]
    assert server.attributes["http.response.status_code"] == 200
    assert server.attributes["error.type"] == "upstream_unreachable"
    assert server.attributes["tollgate.outcome"] == "upstream_error"
    assert server.status_code == STATUS_ERROR
    assert attempt.attributes["error.type"] == "upstream_unreachable"
    assert attempt.status_code == STATUS_ERROR


@live
def test_a_client_that_leaves_a_stream_ends_its_spans_as_disconnected(
    traced_gateway: GatewayServer,
    otlp: OTLPReceiver,
    org: Organization,
    make_route: MakeRoute,
    issue_key: IssueKey,
) -> None:
    # 200 chunks 50 ms apart: ten seconds, if the client stayed.
    make_route(
        model="traced-left", org=org, upstream_model="traced-left-up+tokens=200+chunk_delay_ms=50"
    )
    key = issue_key(org)
    wait_for_key(traced_gateway, key)
    traceparent, trace_id, _ = new_traceparent()

    stream = sdk(traced_gateway, key, traceparent).chat.completions.create(
        model="traced-left", messages=MESSAGES, stream=True
    )
    next(iter(stream))
    stream.close()

    spans = otlp.in_trace(trace_id, count=2)
    (server,) = [span for span in spans if span.kind == SERVER]
    (attempt,) = [span for span in spans if span.kind == CLIENT]
    assert server.attributes["http.response.status_code"] == 200
    assert server.attributes["error.type"] == "client_disconnected"
    assert server.attributes["tollgate.outcome"] == "client_error"
    assert server.status_code == STATUS_UNSET  # the client's choice, not a server failure
    assert attempt.attributes["error.type"] == "client_disconnected"
    assert server.duration_s < 5


@live
def test_cache_hits_messages_embeddings_and_model_lists_are_spans_too(
    traced_gateway: GatewayServer,
    otlp: OTLPReceiver,
    org: Organization,
    make_route: MakeRoute,
    issue_key: IssueKey,
) -> None:
    route = make_route(model="traced-more", org=org)
    route.cache_ttl_seconds = 60
    route.save()
    key = issue_key(org)
    wait_for_key(traced_gateway, key)
    client = sdk(traced_gateway, key)
    # A fresh question: the cache may outlive an earlier run's database.
    question = [{"role": "user", "content": f"cache me {secrets.token_hex(8)}"}]

    client.chat.completions.create(model="traced-more", messages=question)
    repeat = client.chat.completions.with_raw_response.create(
        model="traced-more", messages=question
    )
    assert repeat.headers["x-tollgate-cache"] == "hit"
    hit = request_span(otlp, repeat.headers["x-request-id"], attempts=0)
    assert hit.attributes["tollgate.cache.hit"] is True
    assert hit.attributes["tollgate.attempt.count"] == 0
    assert children(otlp.received(), hit) == []  # the provider was not called

    message = anthropic.Anthropic(
        base_url=traced_gateway.base_url, api_key=key, max_retries=0
    ).messages.with_raw_response.create(model="traced-more", max_tokens=30, messages=MESSAGES)
    span = request_span(otlp, message.headers["x-request-id"], attempts=1)
    assert span.name == "chat traced-more"
    assert span.attributes["url.path"] == "/v1/messages"
    assert span.attributes["gen_ai.request.max_tokens"] == 30
    assert span.attributes["gen_ai.response.finish_reasons"] == [message.parse().stop_reason]

    embedded = client.embeddings.with_raw_response.create(model="traced-more", input="hello")
    span = request_span(otlp, embedded.headers["x-request-id"], attempts=1)
    (attempt,) = children(otlp.received(), span)
    assert span.name == attempt.name == "embeddings traced-more"
    assert span.attributes["gen_ai.operation.name"] == "embeddings"
    assert span.attributes["gen_ai.usage.input_tokens"] == embedded.parse().usage.prompt_tokens

    listed = httpx.get(f"{traced_gateway.v1}/models", headers={"authorization": f"Bearer {key}"})
    span = request_span(otlp, listed.headers["x-request-id"], attempts=0)
    assert span.name == "GET /v1/models"
    assert span.attributes["http.route"] == "/v1/models"
    assert "gen_ai.operation.name" not in span.attributes


@pytest.fixture
def route_over(mock_url: str):
    """Build a route `model_name` over mock deployments given as (name, upstream model)."""

    def build(model_name: str, *deployments: tuple[str, str], **route_fields: object) -> Route:
        provider = Provider.objects.create(name="mock", kind=Provider.Kind.MOCK, base_url=mock_url)
        route = Route.objects.create(model_name=model_name, **route_fields)
        for priority, (name, upstream) in enumerate(deployments):
            route.deployments.add(
                Deployment.objects.create(
                    provider=provider, name=name, upstream_model=upstream, priority=priority
                )
            )
        return route

    return build


@live
def test_each_failover_attempt_is_a_client_span_and_each_call_carries_its_own_context(
    traced_gateway: GatewayServer,
    otlp: OTLPReceiver,
    org: Organization,
    route_over,
    issue_key: IssueKey,
    mock_url: str,
) -> None:
    route_over("traced-failover", ("tr-primary", "tr-p+fault=500"), ("tr-backup", "tr-b"))
    key = issue_key(org)
    wait_for_key(traced_gateway, key)

    raw = sdk(traced_gateway, key).chat.completions.with_raw_response.create(
        model="traced-failover", messages=MESSAGES
    )
    assert raw.headers["x-tollgate-deployment"] == "tr-backup"
    request_id = raw.headers["x-request-id"]

    server = request_span(otlp, request_id, attempts=2)
    failed, answered = children(otlp.received(), server)
    assert server.parent_span_id == ""  # no traceparent from the client: a new trace
    assert server.attributes["tollgate.attempt.count"] == 2
    assert server.attributes["tollgate.deployment.name"] == "tr-backup"
    assert server.attributes["http.response.status_code"] == 200
    assert server.status_code == STATUS_UNSET

    assert failed.attributes["tollgate.deployment.name"] == "tr-primary"
    assert failed.attributes["gen_ai.request.model"] == "tr-p+fault=500"
    assert failed.attributes["error.type"] == "upstream_error"
    assert failed.status_code == STATUS_ERROR
    assert failed.attributes["tollgate.attempt"] == 1
    assert answered.attributes["tollgate.deployment.name"] == "tr-backup"
    assert answered.attributes["http.response.status_code"] == 200
    assert answered.status_code == STATUS_UNSET
    assert answered.attributes["tollgate.attempt"] == 2
    assert "tollgate.attempt.retry" not in answered.attributes
    assert failed.end_ns <= answered.start_ns

    # Each upstream call carried the context of its own attempt span.
    calls = upstream_calls(mock_url, request_id)
    assert [call["json"]["model"] for call in calls] == ["tr-p+fault=500", "tr-b"]
    contexts = [traceparent_parts(call["headers"]["traceparent"]) for call in calls]
    assert [(trace_id, span_id) for trace_id, span_id, _ in contexts] == [
        (server.trace_id, failed.span_id),
        (server.trace_id, answered.span_id),
    ]
    assert all(sampled for _, _, sampled in contexts)


@live
def test_retries_and_fallbacks_are_marked_and_a_failed_request_is_an_error_span(
    traced_gateway: GatewayServer,
    otlp: OTLPReceiver,
    org: Organization,
    route_over,
    issue_key: IssueKey,
) -> None:
    route_over("traced-spare", ("tr-spare", "tr-s+fault=503"))
    route_over(
        "traced-main", ("tr-lone", "tr-l+fault=500"),
        max_attempts=3, fallback_models=["traced-spare"],
    )  # fmt: skip
    key = issue_key(org)
    wait_for_key(traced_gateway, key)

    with pytest.raises(openai.APIStatusError) as raised:
        sdk(traced_gateway, key).chat.completions.create(model="traced-main", messages=MESSAGES)
    assert raised.value.status_code == 502
    request_id = raised.value.response.headers["x-request-id"]

    server = request_span(otlp, request_id, attempts=3)
    attempts = children(otlp.received(), server)
    # Every deployment once (the fallback route's too), then the first one again.
    assert [
        (
            span.attributes["tollgate.deployment.name"],
            span.attributes.get("tollgate.attempt.retry", False),
            span.attributes.get("tollgate.attempt.fallback", False),
            span.attributes["error.type"],
        )
        for span in attempts
    ] == [
        ("tr-lone", False, False, "upstream_error"),
        ("tr-spare", False, True, "upstream_error"),
        ("tr-lone", True, False, "upstream_error"),
    ]
    assert all(span.status_code == STATUS_ERROR for span in attempts)
    assert server.name == "chat traced-main"
    assert server.status_code == STATUS_ERROR
    assert server.attributes["http.response.status_code"] == 502
    assert server.attributes["error.type"] == "upstream_error"
    assert server.attributes["tollgate.outcome"] == "upstream_error"


@live
def test_a_refused_key_is_a_span_with_its_error_and_no_attempt(
    traced_gateway: GatewayServer, otlp: OTLPReceiver
) -> None:
    traceparent, trace_id, _ = new_traceparent()
    with pytest.raises(openai.AuthenticationError):
        sdk(traced_gateway, "tgk_Nope1234_" + "x" * 44, traceparent).chat.completions.create(
            model="anything", messages=MESSAGES
        )
    (server,) = otlp.in_trace(trace_id, count=1)
    time.sleep(EXPORT_DELAY_MS * 4 / 1000)
    assert len([span for span in otlp.received() if span.trace_id == trace_id]) == 1
    assert server.name == "chat"  # the model is not known before the key is
    assert server.attributes["http.response.status_code"] == 401
    assert server.attributes["error.type"] == "invalid_api_key"
    assert server.attributes["tollgate.request.id"]
    assert "tgk_Nope1234" not in everything_recorded([server])


@live
def test_an_unsampled_request_exports_nothing_but_still_propagates_its_context(
    django_db_setup: None,
    org: Organization,
    make_route: MakeRoute,
    issue_key: IssueKey,
    mock_url: str,
) -> None:
    make_route(model="traced-unsampled", org=org)
    with (
        otlp_receiver() as otlp,
        gateway_server(
            OTEL_EXPORTER_OTLP_TRACES_ENDPOINT=f"{otlp.url}/v1/traces",
            OTEL_BSP_SCHEDULE_DELAY=str(EXPORT_DELAY_MS),
            OTEL_TRACES_SAMPLER="traceidratio",
            OTEL_TRACES_SAMPLER_ARG="0",
        ) as gateway,
    ):
        key = issue_key(org)
        wait_for_key(gateway, key)
        traceparent, trace_id, client_span_id = new_traceparent()
        raw = sdk(gateway, key, traceparent).chat.completions.with_raw_response.create(
            model="traced-unsampled", messages=MESSAGES
        )
        time.sleep(QUIET_S)
        assert otlp.received() == []
    (call,) = upstream_calls(mock_url, raw.headers["x-request-id"])
    call_trace_id, call_span_id, sampled = traceparent_parts(call["headers"]["traceparent"])
    assert (call_trace_id, sampled) == (trace_id, False)
    assert call_span_id != client_span_id


@live
def test_queued_spans_are_exported_when_the_gateway_shuts_down(
    django_db_setup: None,
    org: Organization,
    make_route: MakeRoute,
    issue_key: IssueKey,
) -> None:
    make_route(model="traced-flush", org=org)
    with otlp_receiver() as otlp:
        # Batches would leave only after ten minutes: shutting down must flush them.
        with gateway_server(
            OTEL_EXPORTER_OTLP_ENDPOINT=otlp.url, OTEL_BSP_SCHEDULE_DELAY="600000"
        ) as gateway:
            key = issue_key(org)
            wait_for_key(gateway, key)
            traceparent, trace_id, _ = new_traceparent()
            sdk(gateway, key, traceparent).chat.completions.create(
                model="traced-flush", messages=MESSAGES
            )
            time.sleep(QUIET_S)
            assert otlp.received() == []
        spans = otlp.in_trace(trace_id, count=2)
    assert {span.name for span in spans} == {"chat traced-flush"}
    assert spans[0].resource["service.name"] == "tollgate"  # OTEL_SERVICE_NAME unset


def _port_free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


OFF_ENVIRONMENTS = {
    # Nothing set: the exporter's default endpoint (localhost:4318) would get spans.
    "unset": {},
    "sdk-disabled": {"OTEL_SDK_DISABLED": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": "{otlp}"},
    "exporter-none": {"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "{otlp}"},
}


@live
@pytest.mark.parametrize("setting", OFF_ENVIRONMENTS)
def test_tracing_off_exports_nothing_and_sends_no_traceparent_upstream(
    setting: str,
    django_db_setup: None,
    org: Organization,
    make_route: MakeRoute,
    issue_key: IssueKey,
    mock_url: str,
) -> None:
    port = 4318 if setting == "unset" else 0
    if port and not _port_free(port):
        pytest.skip("port 4318 (OTLP's default) is taken on this machine")
    make_route(model="untraced", org=org)
    with otlp_receiver(port) as otlp:
        env = {
            name: value.format(otlp=otlp.url) for name, value in OFF_ENVIRONMENTS[setting].items()
        }
        env["OTEL_BSP_SCHEDULE_DELAY"] = str(EXPORT_DELAY_MS)  # would export at once if on
        with gateway_server(**env) as gateway:
            key = issue_key(org)
            wait_for_key(gateway, key)
            traceparent, _, _ = new_traceparent()
            raw = sdk(gateway, key, traceparent).chat.completions.with_raw_response.create(
                model="untraced", messages=MESSAGES
            )
            time.sleep(QUIET_S)
        assert otlp.posts == 0
    (call,) = upstream_calls(mock_url, raw.headers["x-request-id"])
    assert "traceparent" not in call["headers"]


def test_tracing_off_loads_no_tracer_sdk_and_installs_no_tracer() -> None:
    """The proxy and its adapters load, and tracing_start says off, without OpenTelemetry's
    tracing SDK or an exporter. (redis-py imports OpenTelemetry's API and metrics SDK
    itself when they are installed; that is not tracing.)"""
    script = (
        "import sys, django; django.setup()\n"
        "import routing.proxy.app, routing.providers\n"
        "from routing.proxy.tracing import tracing_start\n"
        "assert tracing_start() is None\n"
        "loaded = sorted(m for m in sys.modules if m == 'routing.proxy.otel'\n"
        "    or m.startswith(('opentelemetry.sdk.trace', 'opentelemetry.exporter')))\n"
        "assert not loaded, loaded\n"
        "api = sys.modules.get('opentelemetry.trace')\n"
        "assert api is None or api._TRACER_PROVIDER is None\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env["DJANGO_SETTINGS_MODULE"] = "gatewaysite.settings"
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO_ROOT, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.parametrize(
    ("environ", "exporters"),
    [
        ({}, []),
        ({"OTEL_SERVICE_NAME": "x", "OTEL_TRACES_SAMPLER": "always_on"}, []),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, ["otlp"]),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"}, ["otlp"]),
        ({"OTEL_TRACES_EXPORTER": "otlp"}, ["otlp"]),
        ({"OTEL_TRACES_EXPORTER": "console, otlp"}, ["console", "otlp"]),
        ({"OTEL_TRACES_EXPORTER": "otlp,"}, ["otlp"]),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c"}, []),
        ({"OTEL_SDK_DISABLED": "TRUE", "OTEL_TRACES_EXPORTER": "otlp"}, []),
        ({"OTEL_SDK_DISABLED": "false", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c"}, ["otlp"]),
    ],
)
def test_the_standard_environment_variables_turn_tracing_on_and_off(
    environ: dict[str, str], exporters: list[str]
) -> None:
    assert trace_exporters_named(environ) == exporters
