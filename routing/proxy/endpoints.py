"""The proxy's endpoints, each a pipeline read top to bottom."""

import asyncio
import contextlib
from collections.abc import AsyncIterator

import orjson

from billing.models import UsageEvent
from routing.contracts import RoutePlan
from routing.errors import GatewayError, NotFound
from routing.formats.anthropic_messages import MessagesStreamTranslator, message_from_completion
from routing.providers import adapter_for
from routing.providers.base import UpstreamStream
from routing.proxy.http import ProxyRequest, Response, StreamingResponse
from routing.proxy.metering import Meter
from routing.proxy.runtime import ProxyRuntime
from routing.proxy.steps import (
    apply_param_policy,
    authenticate,
    choose_deployment,
    parse_chat_request,
    parse_embeddings_request,
    parse_messages_request,
    resolve_route,
)
from routing.snapshot import ConfigSnapshot
from tenants.contracts import KeyContext

Outcome = UsageEvent.Outcome


def _authenticated(
    request: ProxyRequest, runtime: ProxyRuntime, endpoint: str
) -> tuple[ConfigSnapshot, KeyContext, Meter]:
    """Authenticate against one snapshot and open the request's usage meter."""
    snapshot = runtime.snapshot
    key = authenticate(request, snapshot)
    meter = Meter(
        request=request, key=key, endpoint=endpoint, snapshot=snapshot, sink=runtime.usage
    )
    return snapshot, key, meter


async def chat_completions(
    request: ProxyRequest, runtime: ProxyRuntime
) -> Response | StreamingResponse:
    """POST /v1/chat/completions (OpenAI format), streamed or not."""
    snapshot, key, meter = _authenticated(request, runtime, "chat.completions")
    try:
        chat = parse_chat_request(request.body)
        meter.model, meter.is_stream = chat.model, chat.stream
        meter.route = resolve_route(snapshot, key, chat.model)
        meter.deployment = deployment = choose_deployment(meter.route)
        adapter = adapter_for(runtime.adapters, deployment.provider_kind)
        chat = apply_param_policy(chat, adapter, meter.route)
        headers = {"x-request-id": request.request_id}
        if chat.stream:
            stream = await adapter.chat_stream(deployment, chat, request_id=request.request_id)
            relay = _relay(stream, meter)
            # Wait for the first event before answering: a failure until then still
            # gets a real status code, and the relay is started, so its cleanup
            # runs even if the client leaves before the first write.
            first_chunk = await anext(relay, b"")
            return StreamingResponse(
                status=200, first_chunk=first_chunk, chunks=relay, headers=headers
            )
        reply = await adapter.chat(deployment, chat, request_id=request.request_id)
    except GatewayError as exc:
        meter.record_failure(exc)
        raise
    meter.record(outcome=Outcome.SUCCESS, status_code=200, usage=reply.usage)
    return Response(status=200, body=reply.body, headers=headers)


async def _relay(stream: UpstreamStream, meter: Meter) -> AsyncIterator[bytes]:
    """Forward stream events as they arrive; bill what was produced, however it ends.

    A failure before the first event is raised (the client still gets a status
    code); after it, the stream ends with an error event instead.
    """
    failure: GatewayError | None = None
    disconnected = started = False
    try:
        async for chunk in stream.events():
            meter.first_byte_sent()
            started = True
            yield chunk
    except GatewayError as exc:
        failure = exc
        if not started:
            raise
        # The SDKs raise on an error event, so the client never mistakes this for an answer.
        yield b"data: " + exc.openai_body() + b"\n\n"
    except (asyncio.CancelledError, GeneratorExit):
        disconnected = True
        raise
    finally:
        await stream.aclose()
        if failure is not None:
            meter.record_failure(failure, usage=stream.usage)
        elif disconnected:
            meter.record(
                outcome=Outcome.CLIENT_ERROR,
                status_code=499,
                usage=stream.usage,
                error_class="client_disconnected",
            )
        else:
            meter.record(outcome=Outcome.SUCCESS, status_code=200, usage=stream.usage)


async def messages(request: ProxyRequest, runtime: ProxyRuntime) -> Response | StreamingResponse:
    """POST /v1/messages (Anthropic format), served by whichever provider the route names."""
    snapshot, key, meter = _authenticated(request, runtime, "messages")
    try:
        chat = parse_messages_request(request.body)
        meter.model, meter.is_stream = chat.model, chat.stream
        meter.route = resolve_route(snapshot, key, chat.model)
        meter.deployment = deployment = choose_deployment(meter.route)
        adapter = adapter_for(runtime.adapters, deployment.provider_kind)
        chat = apply_param_policy(chat, adapter, meter.route)
        headers = {"x-request-id": request.request_id}
        if chat.stream:
            stream = await adapter.chat_stream(deployment, chat, request_id=request.request_id)
            events = _as_anthropic_events(_relay(stream, meter), stream, chat.model)
            # Started here for the same reasons as in chat_completions.
            first_chunk = await anext(events, b"")
            return StreamingResponse(
                status=200, first_chunk=first_chunk, chunks=events, headers=headers
            )
        reply = await adapter.chat(deployment, chat, request_id=request.request_id)
    except GatewayError as exc:
        meter.record_failure(exc)
        raise
    meter.record(outcome=Outcome.SUCCESS, status_code=200, usage=reply.usage)
    body = message_from_completion(reply.body, reply.usage)
    return Response(status=200, body=body, headers=headers)


async def _as_anthropic_events(
    relay: AsyncIterator[bytes], stream: UpstreamStream, model: str
) -> AsyncIterator[bytes]:
    """The relayed OpenAI stream as Anthropic Messages stream events."""
    translator = MessagesStreamTranslator(model=model)
    async with contextlib.aclosing(relay):  # type: ignore[type-var]
        async for chunk in relay:
            translated = b"".join(translator.feed(chunk))
            if translated:
                yield translated
    yield b"".join(translator.finish(stream.usage))


async def embeddings(request: ProxyRequest, runtime: ProxyRuntime) -> Response:
    """POST /v1/embeddings (OpenAI format)."""
    snapshot, key, meter = _authenticated(request, runtime, "embeddings")
    try:
        embedding_request = parse_embeddings_request(request.body)
        meter.model = embedding_request.model
        meter.route = resolve_route(snapshot, key, embedding_request.model)
        meter.deployment = deployment = choose_deployment(meter.route)
        adapter = adapter_for(runtime.adapters, deployment.provider_kind)
        reply = await adapter.embeddings(
            deployment, embedding_request, request_id=request.request_id
        )
    except GatewayError as exc:
        meter.record_failure(exc)
        raise
    meter.record(outcome=Outcome.SUCCESS, status_code=200, usage=reply.usage)
    return Response(status=200, body=reply.body, headers={"x-request-id": request.request_id})


def _model_object(plan: RoutePlan, key: KeyContext) -> dict[str, object]:
    owner = key.org_slug if plan.org_id is not None else "tollgate"
    return {"id": plan.model_name, "object": "model", "created": plan.created, "owned_by": owner}


async def list_models(request: ProxyRequest, runtime: ProxyRuntime) -> Response:
    """GET /v1/models: only the models this key may call."""
    snapshot, key, meter = _authenticated(request, runtime, "models")
    data = [_model_object(plan, key) for plan in snapshot.plans_for(key)]
    meter.record(outcome=Outcome.SUCCESS, status_code=200)
    body = orjson.dumps({"object": "list", "data": data})
    return Response(status=200, body=body, headers={"x-request-id": request.request_id})


async def retrieve_model(request: ProxyRequest, runtime: ProxyRuntime, model: str) -> Response:
    """GET /v1/models/{model}: 404 unless this key may call it."""
    snapshot, key, meter = _authenticated(request, runtime, "models")
    meter.model = model
    plan = snapshot.route_for(org_id=key.org_id, model=model)
    if plan is None or not key.may_use(model):
        exc = NotFound(
            f"The model '{model}' does not exist or you do not have access to it.",
            code="model_not_found",
        )
        meter.record_failure(exc)
        raise exc
    meter.record(outcome=Outcome.SUCCESS, status_code=200)
    body = orjson.dumps(_model_object(plan, key))
    return Response(status=200, body=body, headers={"x-request-id": request.request_id})
