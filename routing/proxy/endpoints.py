"""The proxy's endpoints, each a pipeline read top to bottom."""

import asyncio
import contextlib
import dataclasses
import logging
import random
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any, NamedTuple

import orjson

from billing.models import UsageEvent
from routing.cache import CachedReply, cache_key, stream_from_completion
from routing.contracts import ChatRequest, DeploymentSpec, RoutePlan
from routing.errors import GatewayError, NotFound
from routing.formats.anthropic_messages import MessagesStreamTranslator, message_from_completion
from routing.providers import adapter_for
from routing.providers.base import ProviderAdapter, UpstreamReply, UpstreamStream
from routing.proxy.failover import Demand, serve_with_failover
from routing.proxy.http import ProxyRequest, Response, StreamingResponse
from routing.proxy.metering import Meter
from routing.proxy.runtime import ProxyRuntime
from routing.proxy.steps import (
    apply_param_policy,
    authenticate,
    end_user_of,
    parse_attribution,
    parse_chat_request,
    parse_embeddings_request,
    parse_messages_request,
    resolve_route,
)
from routing.snapshot import ConfigSnapshot
from routing.tokens import estimate_input_tokens, estimate_prompt_tokens
from tenants.contracts import KeyContext

Outcome = UsageEvent.Outcome
logger = logging.getLogger(__name__)


def _authenticated(
    request: ProxyRequest, runtime: ProxyRuntime, endpoint: str
) -> tuple[ConfigSnapshot, KeyContext, Meter]:
    """Authenticate against one snapshot and open the request's usage meter."""
    snapshot = runtime.snapshot
    key = authenticate(request, snapshot)
    meter = Meter(
        request=request,
        key=key,
        endpoint=endpoint,
        snapshot=snapshot,
        sink=runtime.usage,
        health=runtime.health,
    )
    try:
        meter.tags, meter.end_user = parse_attribution(request)
    except GatewayError as exc:
        meter.record_failure(exc)  # a rejected request is still metered, once
        raise
    return snapshot, key, meter


def _demand(payload: dict[str, Any]) -> Demand:
    max_output = payload.get("max_completion_tokens") or payload.get("max_tokens")
    return Demand(
        estimate=lambda: estimate_prompt_tokens(payload),
        max_output_tokens=max_output if isinstance(max_output, int) else None,
    )


def _served_headers(request: ProxyRequest, meter: Meter) -> dict[str, str]:
    """Which deployment answered, after how many upstream calls, and the request id."""
    assert meter.deployment is not None
    return {
        "x-request-id": request.request_id,
        "x-tollgate-deployment": meter.deployment.name,
        "x-tollgate-attempts": str(meter.attempts),
    }


class CacheLookup(NamedTuple):
    status: str  # "off", "bypass", "miss" or "hit": the x-tollgate-cache header
    entry_key: str | None  # where to store the answer on a miss
    hit: CachedReply | None


async def _cache_lookup(
    request: ProxyRequest, runtime: ProxyRuntime, key: KeyContext, meter: Meter, chat: ChatRequest
) -> CacheLookup:
    """Whether the route caches, and the cached answer if there is one."""
    plan = meter.route
    assert plan is not None
    if not plan.cache_ttl_s:
        return CacheLookup("off", None, None)
    if request.headers.get("x-tollgate-cache", "").lower() == "bypass":
        return CacheLookup("bypass", None, None)
    entry_key = cache_key(org_id=key.org_id, model=chat.model, payload=chat.payload)
    hit = await runtime.cache.get(entry_key)
    if hit is not None:
        meter.cache_hit = True
        if plan.cache_hits_billed:
            meter.priced_as = (hit.provider_kind, hit.upstream_model)
        meter.record(outcome=Outcome.SUCCESS, status_code=200, usage=hit.usage)
        return CacheLookup("hit", entry_key, hit)
    return CacheLookup("miss", entry_key, None)


def _hit_headers(request: ProxyRequest, hit: CachedReply) -> dict[str, str]:
    return {
        "x-request-id": request.request_id,
        "x-tollgate-cache": "hit",
        "x-tollgate-deployment": hit.deployment_name,
        "x-tollgate-attempts": "0",
    }


async def _cache_store(
    runtime: ProxyRuntime, meter: Meter, entry_key: str, reply: UpstreamReply
) -> None:
    """Keep a complete answer for the route's cache TTL."""
    assert meter.route is not None and meter.deployment is not None
    deployment = meter.deployment
    await runtime.cache.set(
        entry_key,
        CachedReply(
            body=reply.body,
            usage=reply.usage,
            deployment_name=deployment.name,
            provider_kind=deployment.provider_kind,
            upstream_model=deployment.upstream_model,
        ),
        meter.route.cache_ttl_s,
    )


async def _nothing_more() -> AsyncIterator[bytes]:
    """The rest of a stream that was sent whole as its first chunk."""
    return
    yield b""


async def _serve_chat(
    request: ProxyRequest, runtime: ProxyRuntime, snapshot: ConfigSnapshot, key: KeyContext,
    meter: Meter, chat: ChatRequest,
) -> UpstreamReply | tuple[bytes, AsyncIterator[bytes]]:  # fmt: skip
    """A chat answer from the first deployment that gives one (a stream: its first chunk)."""
    plan = meter.route
    assert plan is not None

    async def attempt(
        deployment: DeploymentSpec, adapter: ProviderAdapter
    ) -> UpstreamReply | tuple[bytes, AsyncIterator[bytes]]:
        accepted = apply_param_policy(chat, adapter, plan)
        if not chat.stream:
            return await adapter.chat(deployment, accepted, request_id=request.request_id)
        stream = await adapter.chat_stream(deployment, accepted, request_id=request.request_id)
        relay = _relay(stream, meter)
        # Wait for the first event before answering: a failure until then can
        # still fail over or get a real status code, and the relay is started,
        # so its cleanup runs even if the client leaves before the first write.
        return await anext(relay, b""), relay

    subject = key.prefix
    end_user = chat.payload.get("user")
    if plan.variant_sticky_by == "user" and isinstance(end_user, str) and end_user:
        subject = end_user
    served = await serve_with_failover(
        plan,
        snapshot=snapshot,
        adapters=runtime.adapters,
        health=runtime.health,
        org_id=key.org_id,
        demand=_demand(chat.payload),
        attempt=attempt,
        on_attempt=meter.serving,
        subject=subject,
    )
    if plan.shadow is not None and random.random() * 100 < plan.shadow_percent:
        runtime.spawn(_shadow_call(request, runtime, snapshot, key, meter, chat))
    return served


async def _shadow_call(
    request: ProxyRequest, runtime: ProxyRuntime, snapshot: ConfigSnapshot, key: KeyContext,
    primary: Meter, chat: ChatRequest,
) -> None:  # fmt: skip
    """Mirror the request to the route's shadow deployment; metered and logged, never seen."""
    plan, shadow = primary.route, primary.route.shadow if primary.route else None
    if plan is None or shadow is None:
        return
    mirrored = dataclasses.replace(
        request, event_id=uuid.uuid4(), started_at=datetime.now(UTC),
        started_monotonic=time.monotonic(),
    )  # fmt: skip
    meter = Meter(
        request=mirrored, key=key, endpoint=f"{primary.endpoint}.shadow", snapshot=snapshot,
        sink=runtime.usage, health=runtime.health,
    )  # fmt: skip
    meter.model, meter.route = chat.model, plan
    meter.tags, meter.end_user = primary.tags, primary.end_user
    meter.serving(shadow)
    # Always a complete answer: nobody reads a shadow stream.
    payload = {k: v for k, v in chat.payload.items() if k not in ("stream", "stream_options")}
    plain = ChatRequest(model=chat.model, payload=payload, stream=False, include_usage=False)
    try:
        adapter = adapter_for(runtime.adapters, shadow.provider_kind)
        reply = await adapter.chat(
            shadow, apply_param_policy(plain, adapter, plan), request_id=mirrored.request_id
        )
    except GatewayError as exc:
        meter.record_failure(exc)
        logger.info(
            "Shadow call to %s for %s failed: %s", shadow.name, chat.model, exc.code or exc.status
        )
        return
    meter.record(outcome=Outcome.SUCCESS, status_code=200, usage=reply.usage)
    logger.info(
        "Shadow call to %s for %s: %d ms, %d output tokens (primary %s)",
        shadow.name, chat.model, mirrored.elapsed_ms(), reply.usage.output_tokens,
        primary.deployment.name if primary.deployment else "-",
    )  # fmt: skip


async def chat_completions(
    request: ProxyRequest, runtime: ProxyRuntime
) -> Response | StreamingResponse:
    """POST /v1/chat/completions (OpenAI format), streamed or not."""
    snapshot, key, meter = _authenticated(request, runtime, "chat.completions")
    try:
        chat = parse_chat_request(request.body)
        meter.model, meter.is_stream = chat.model, chat.stream
        meter.end_user = end_user_of(chat.payload, meter.end_user)
        meter.route = resolve_route(snapshot, key, chat.model)
        cache = await _cache_lookup(request, runtime, key, meter, chat)
        if (hit := cache.hit) is not None:
            if not chat.stream:
                return Response(status=200, body=hit.body, headers=_hit_headers(request, hit))
            replay = stream_from_completion(hit.body, include_usage=chat.include_usage)
            return StreamingResponse(
                status=200, first_chunk=replay, chunks=_nothing_more(),
                headers=_hit_headers(request, hit),
            )  # fmt: skip
        served = await _serve_chat(request, runtime, snapshot, key, meter, chat)
    except GatewayError as exc:
        meter.record_failure(exc)
        raise
    headers = _served_headers(request, meter)
    if cache.status != "off":
        headers["x-tollgate-cache"] = cache.status
    if isinstance(served, tuple):
        first_chunk, relay = served
        return StreamingResponse(status=200, first_chunk=first_chunk, chunks=relay, headers=headers)
    meter.record(outcome=Outcome.SUCCESS, status_code=200, usage=served.usage)
    if cache.entry_key is not None:
        await _cache_store(runtime, meter, cache.entry_key, served)
    return Response(status=200, body=served.body, headers=headers)


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
        if failure is not None and not started:
            pass  # not answered yet: the caller fails over, or records the failure
        elif failure is not None:
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
        meter.end_user = end_user_of(chat.payload, meter.end_user)
        meter.route = resolve_route(snapshot, key, chat.model)
        cache = await _cache_lookup(request, runtime, key, meter, chat)
        if (hit := cache.hit) is not None:
            headers = _hit_headers(request, hit)
            if not chat.stream:
                body = message_from_completion(hit.body, hit.usage)
                return Response(status=200, body=body, headers=headers)
            translator = MessagesStreamTranslator(model=chat.model)
            replay = stream_from_completion(hit.body, include_usage=False)
            events = b"".join([*translator.feed(replay), *translator.finish(hit.usage)])
            return StreamingResponse(
                status=200, first_chunk=events, chunks=_nothing_more(), headers=headers
            )
        served = await _serve_chat(request, runtime, snapshot, key, meter, chat)
        headers = _served_headers(request, meter)
        if cache.status != "off":
            headers["x-tollgate-cache"] = cache.status
        if isinstance(served, tuple):
            first_chunk, relay = served
            events = _as_anthropic_events(first_chunk, relay, meter, chat.model)
            # Started here for the same reasons as the relay itself.
            return StreamingResponse(
                status=200, first_chunk=await anext(events, b""), chunks=events, headers=headers
            )
    except GatewayError as exc:
        meter.record_failure(exc)
        raise
    meter.record(outcome=Outcome.SUCCESS, status_code=200, usage=served.usage)
    if cache.entry_key is not None:
        await _cache_store(runtime, meter, cache.entry_key, served)
    return Response(
        status=200, body=message_from_completion(served.body, served.usage), headers=headers
    )


async def _as_anthropic_events(
    first_chunk: bytes, relay: AsyncIterator[bytes], meter: Meter, model: str
) -> AsyncIterator[bytes]:
    """The relayed OpenAI stream as Anthropic Messages stream events."""
    translator = MessagesStreamTranslator(model=model)
    async with contextlib.aclosing(relay):  # type: ignore[type-var]
        translated = b"".join(translator.feed(first_chunk))
        if translated:
            yield translated
        async for chunk in relay:
            translated = b"".join(translator.feed(chunk))
            if translated:
                yield translated
    yield b"".join(translator.finish(meter.last_usage))


async def embeddings(request: ProxyRequest, runtime: ProxyRuntime) -> Response:
    """POST /v1/embeddings (OpenAI format)."""
    snapshot, key, meter = _authenticated(request, runtime, "embeddings")
    try:
        embedding_request = parse_embeddings_request(request.body)
        meter.model = embedding_request.model
        meter.end_user = end_user_of(embedding_request.payload, meter.end_user)
        meter.route = resolve_route(snapshot, key, embedding_request.model)

        async def attempt(deployment: DeploymentSpec, adapter: ProviderAdapter) -> UpstreamReply:
            return await adapter.embeddings(
                deployment, embedding_request, request_id=request.request_id
            )

        reply = await serve_with_failover(
            meter.route,
            snapshot=snapshot,
            adapters=runtime.adapters,
            health=runtime.health,
            org_id=key.org_id,
            demand=Demand(
                estimate=lambda: estimate_input_tokens(embedding_request.payload.get("input")),
                max_output_tokens=None,
            ),
            attempt=attempt,
            on_attempt=meter.serving,
        )
    except GatewayError as exc:
        meter.record_failure(exc)
        raise
    meter.record(outcome=Outcome.SUCCESS, status_code=200, usage=reply.usage)
    return Response(status=200, body=reply.body, headers=_served_headers(request, meter))


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
