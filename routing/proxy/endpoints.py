"""The proxy's endpoints, each a pipeline read top to bottom."""

import asyncio
from collections.abc import AsyncIterator

import orjson

from billing.models import UsageEvent
from routing.errors import GatewayError, NotFound, UpstreamError
from routing.providers import adapter_for
from routing.providers.base import UpstreamStream
from routing.proxy.http import ProxyRequest, Response, StreamingResponse
from routing.proxy.metering import Meter
from routing.proxy.runtime import ProxyRuntime
from routing.proxy.steps import (
    authenticate,
    choose_deployment,
    parse_chat_request,
    parse_embeddings_request,
    resolve_route,
)

Outcome = UsageEvent.Outcome


def _outcome_of(exc: GatewayError) -> str:
    """Upstream failures count against the provider; a rejected request against the client."""
    if isinstance(exc, UpstreamError) and exc.retryable:
        return Outcome.UPSTREAM_ERROR
    return Outcome.CLIENT_ERROR


async def chat_completions(
    request: ProxyRequest, runtime: ProxyRuntime
) -> Response | StreamingResponse:
    """POST /v1/chat/completions (OpenAI format), streamed or not."""
    snapshot = runtime.snapshot
    key = authenticate(request, snapshot)
    meter = Meter(
        request=request, key=key, endpoint="chat.completions", snapshot=snapshot, sink=runtime.usage
    )
    try:
        chat = parse_chat_request(request.body)
        meter.model, meter.is_stream = chat.model, chat.stream
        meter.route = resolve_route(snapshot, key, chat.model)
        meter.deployment = deployment = choose_deployment(meter.route)
        adapter = adapter_for(runtime.adapters, deployment.provider_kind)
        headers = {"x-request-id": request.request_id}
        if chat.stream:
            stream = await adapter.chat_stream(deployment, chat, request_id=request.request_id)
            return StreamingResponse(status=200, chunks=_relay(stream, meter), headers=headers)
        reply = await adapter.chat(deployment, chat, request_id=request.request_id)
    except GatewayError as exc:
        meter.record(outcome=_outcome_of(exc), status_code=exc.status, error_class=exc.code or "")
        raise
    meter.record(outcome=Outcome.SUCCESS, status_code=200, usage=reply.usage)
    return Response(status=200, body=reply.body, headers=headers)


async def _relay(stream: UpstreamStream, meter: Meter) -> AsyncIterator[bytes]:
    """Forward stream events as they arrive; bill what was produced, however it ends."""
    outcome, status_code, error_class = Outcome.SUCCESS, 200, ""
    try:
        async for chunk in stream.events():
            meter.first_byte_sent()
            yield chunk
    except UpstreamError as exc:
        # Headers are sent: end the stream with an error event the SDKs raise on.
        outcome, status_code, error_class = Outcome.UPSTREAM_ERROR, exc.status, exc.code or ""
        yield b"data: " + exc.openai_body() + b"\n\n"
    except (asyncio.CancelledError, GeneratorExit):
        outcome, status_code, error_class = Outcome.CLIENT_ERROR, 499, "client_disconnected"
        raise
    finally:
        await stream.aclose()
        meter.record(
            outcome=outcome, status_code=status_code, usage=stream.usage, error_class=error_class
        )


async def embeddings(request: ProxyRequest, runtime: ProxyRuntime) -> Response:
    """POST /v1/embeddings (OpenAI format)."""
    snapshot = runtime.snapshot
    key = authenticate(request, snapshot)
    meter = Meter(
        request=request, key=key, endpoint="embeddings", snapshot=snapshot, sink=runtime.usage
    )
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
        meter.record(outcome=_outcome_of(exc), status_code=exc.status, error_class=exc.code or "")
        raise
    meter.record(outcome=Outcome.SUCCESS, status_code=200, usage=reply.usage)
    return Response(status=200, body=reply.body, headers={"x-request-id": request.request_id})


def _model_object(name: str, created: int, owner: str) -> dict[str, object]:
    return {"id": name, "object": "model", "created": created, "owned_by": owner}


async def list_models(request: ProxyRequest, runtime: ProxyRuntime) -> Response:
    """GET /v1/models: only the models this key may call."""
    snapshot = runtime.snapshot
    key = authenticate(request, snapshot)
    meter = Meter(
        request=request, key=key, endpoint="models", snapshot=snapshot, sink=runtime.usage
    )
    data = []
    for name in snapshot.model_names_for(key):
        plan = snapshot.route_for(org_id=key.org_id, model=name)
        assert plan is not None
        owner = key.org_slug if plan.org_id is not None else "tollgate"
        data.append(_model_object(name, plan.created, owner))
    meter.record(outcome=Outcome.SUCCESS, status_code=200)
    body = orjson.dumps({"object": "list", "data": data})
    return Response(status=200, body=body, headers={"x-request-id": request.request_id})


async def retrieve_model(request: ProxyRequest, runtime: ProxyRuntime, model: str) -> Response:
    """GET /v1/models/{model}: 404 unless this key may call it."""
    snapshot = runtime.snapshot
    key = authenticate(request, snapshot)
    meter = Meter(
        request=request, key=key, endpoint="models", snapshot=snapshot, sink=runtime.usage
    )
    meter.model = model
    plan = snapshot.route_for(org_id=key.org_id, model=model)
    if plan is None or not key.may_use(model):
        exc = NotFound(
            f"The model '{model}' does not exist or you do not have access to it.",
            code="model_not_found",
        )
        meter.record(
            outcome=Outcome.CLIENT_ERROR, status_code=exc.status, error_class=exc.code or ""
        )
        raise exc
    meter.record(outcome=Outcome.SUCCESS, status_code=200)
    owner = key.org_slug if plan.org_id is not None else "tollgate"
    body = orjson.dumps(_model_object(model, plan.created, owner))
    return Response(status=200, body=body, headers={"x-request-id": request.request_id})
