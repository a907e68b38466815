"""The proxy's endpoints, each a pipeline read top to bottom."""

import asyncio
import contextlib
import dataclasses
import logging
import random
import time
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Any, NamedTuple

import orjson
from django.conf import settings
from django.db import DatabaseError
from redis.exceptions import RedisError

from billing.models import UsageEvent
from routing.cache import CachedReply, cache_key, stream_from_completion
from routing.contracts import ChatRequest, DeploymentSpec, RoutePlan
from routing.errors import GatewayError, LimitsUnavailable, NotFound
from routing.formats.anthropic_messages import MessagesStreamTranslator, message_from_completion
from routing.providers import adapter_for
from routing.providers.base import ProviderAdapter, UpstreamReply, UpstreamStream
from routing.proxy.failover import Demand, serve_with_failover
from routing.proxy.http import ProxyRequest, Response, StreamingResponse
from routing.proxy.limits import (
    HOLD_MARGIN_S,
    admit,
    budget_lines,
    deployment_max_cost,
    has_hard_budget,
    hold_ttl_s,
    key_limits_report,
    max_cost_nanos,
    rate_charges,
)
from routing.proxy.metering import Meter
from routing.proxy.runtime import ProxyRuntime
from routing.proxy.steps import (
    apply_param_policy,
    end_user_of,
    model_name_storable,
    parse_attribution,
    parse_chat_request,
    parse_embeddings_request,
    parse_messages_request,
    resolve_route,
)
from routing.snapshot import ConfigSnapshot
from routing.tokens import (
    estimate_input_tokens,
    estimate_prompt_tokens,
    input_tokens_ceiling,
    prompt_tokens_ceiling,
)
from tenants.contracts import KeyContext

Outcome = UsageEvent.Outcome
logger = logging.getLogger(__name__)


def _metered(
    request: ProxyRequest, runtime: ProxyRuntime, snapshot: ConfigSnapshot, key: KeyContext,
    endpoint: str,
) -> Meter:  # fmt: skip
    """The usage meter of an authenticated request, with its tags and end user."""
    meter = Meter(
        request=request,
        key=key,
        endpoint=endpoint,
        snapshot=snapshot,
        sink=runtime.usage,
        health=runtime.health,
        settle_later=runtime.settle_later,
    )
    try:
        meter.tags, meter.end_user = parse_attribution(request)
    except GatewayError as exc:
        meter.record_failure(exc)  # a rejected request is still metered, once
        raise
    return meter


async def _admit(
    request: ProxyRequest, runtime: ProxyRuntime, snapshot: ConfigSnapshot, key: KeyContext,
    meter: Meter, *, input_ceiling: Callable[[], int], output_tokens: int,
    estimate: Callable[[], int],
) -> None:  # fmt: skip
    """Take the request's rate limits and reserve its largest cost on its budgets, or 429."""
    plan = meter.route
    assert plan is not None
    lines = budget_lines(key.budgets, request.started_at) if key.budgets else []
    amount = 0
    if lines:
        amount = max_cost_nanos(
            plan, snapshot, org_id=key.org_id, input_tokens=input_ceiling(),
            output_tokens=output_tokens, at=request.started_at,
        )  # fmt: skip
    meter.admission = await admit(
        counters=runtime.counters,
        key=key,
        request_id=request.request_id,
        lines=lines,
        amount_nanos=amount,
        ttl_s=hold_ttl_s(plan, snapshot, key.org_id),
        charges=rate_charges(key, estimate),
        fail_open=settings.TOLLGATE_LIMITS_FAIL_OPEN,
        inflight=meter.inflight_entry(lines),
    )


def _asked_output(payload: dict[str, Any]) -> int | None:
    asked = payload.get("max_completion_tokens") or payload.get("max_tokens")
    return asked if isinstance(asked, int) else None


def _bounded_output(chat: ChatRequest, key: KeyContext, plan: RoutePlan) -> tuple[ChatRequest, int]:
    """The request with an output limit if it needs one, and its most output tokens.

    Under a hard budget a request's cost must be bounded: one that sets no limit
    gets the route's (or the default) sent upstream, and reserved.
    """
    choices = chat.payload.get("n") if isinstance(chat.payload.get("n"), int) else 1
    asked = _asked_output(chat.payload)
    if asked is not None:
        return chat, asked * choices
    cap = plan.max_output_tokens or settings.TOLLGATE_DEFAULT_MAX_OUTPUT_TOKENS
    if has_hard_budget(key):
        chat = dataclasses.replace(chat, payload={**chat.payload, "max_tokens": cap})
    return chat, cap * choices


async def _admit_chat(
    request: ProxyRequest, runtime: ProxyRuntime, snapshot: ConfigSnapshot, key: KeyContext,
    meter: Meter, chat: ChatRequest,
) -> ChatRequest:  # fmt: skip
    """Admit a chat request (see `_admit`); it may come back with an output limit added."""
    if not key.budgets and not key.limits:
        return chat
    assert meter.route is not None
    chat, output_tokens = _bounded_output(chat, key, meter.route)
    payload = chat.payload
    await _admit(
        request, runtime, snapshot, key, meter,
        input_ceiling=lambda: prompt_tokens_ceiling(payload),
        output_tokens=output_tokens,
        estimate=lambda: estimate_prompt_tokens(payload) + (_asked_output(payload) or 0),
    )  # fmt: skip
    return chat


def _demand(payload: dict[str, Any]) -> Demand:
    return Demand(
        estimate=lambda: estimate_prompt_tokens(payload), max_output_tokens=_asked_output(payload)
    )


def _served_headers(request: ProxyRequest, meter: Meter) -> dict[str, str]:
    """Which deployment answered, after how many upstream calls, the request id and
    the rate limits left."""
    assert meter.deployment is not None
    return {
        "x-request-id": request.request_id,
        "x-tollgate-deployment": meter.deployment.name,
        "x-tollgate-attempts": str(meter.attempts),
        **(meter.admission.headers if meter.admission else {}),
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
        meter.keep_response(hit.body)
        meter.record(outcome=Outcome.SUCCESS, status_code=200, usage=hit.usage)
        return CacheLookup("hit", entry_key, hit)
    return CacheLookup("miss", entry_key, None)


def _hit_headers(request: ProxyRequest, hit: CachedReply, meter: Meter) -> dict[str, str]:
    return {
        "x-request-id": request.request_id,
        "x-tollgate-cache": "hit",
        "x-tollgate-deployment": hit.deployment_name,
        "x-tollgate-attempts": "0",
        **(meter.admission.headers if meter.admission else {}),
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
        on_attempt_failed=meter.attempt_failed,
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
        sink=runtime.usage, health=runtime.health, settle_later=runtime.settle_later,
    )  # fmt: skip
    meter.model, meter.route = chat.model, plan
    meter.tags, meter.end_user = primary.tags, primary.end_user
    # Always a complete answer: nobody reads a shadow stream.
    payload = {k: v for k, v in chat.payload.items() if k not in ("stream", "stream_options")}
    if key.budgets:
        # Shadow traffic spends the same budgets, so it is reserved like any request;
        # a mirror that does not fit is not sent (and costs nothing).
        lines = budget_lines(key.budgets, mirrored.started_at)
        try:
            meter.admission = await admit(
                counters=runtime.counters, key=key, request_id=mirrored.request_id, lines=lines,
                amount_nanos=deployment_max_cost(
                    shadow, snapshot, org_id=key.org_id,
                    input_tokens=prompt_tokens_ceiling(payload),
                    output_tokens=_asked_output(payload) or 0, at=mirrored.started_at,
                ),
                ttl_s=plan.deadline_s + shadow.total_timeout_s + HOLD_MARGIN_S, charges=(),
                fail_open=False, inflight=meter.inflight_entry(lines),
            )  # fmt: skip
        except GatewayError as exc:
            logger.info("Shadow call to %s skipped: %s", shadow.name, exc.code)
            return
    meter.serving(shadow)
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
    meter.keep_response(reply.body)
    meter.record(outcome=Outcome.SUCCESS, status_code=200, usage=reply.usage)
    logger.info(
        "Shadow call to %s for %s: %d ms, %d output tokens (primary %s)",
        shadow.name, chat.model, mirrored.elapsed_ms(), reply.usage.output_tokens,
        primary.deployment.name if primary.deployment else "-",
    )  # fmt: skip


async def chat_completions(
    request: ProxyRequest, runtime: ProxyRuntime, snapshot: ConfigSnapshot, key: KeyContext
) -> Response | StreamingResponse:
    """POST /v1/chat/completions (OpenAI format), streamed or not."""
    meter = _metered(request, runtime, snapshot, key, "chat.completions")
    try:
        chat = parse_chat_request(request.body)
        meter.model, meter.is_stream = chat.model, chat.stream
        meter.end_user = end_user_of(chat.payload, meter.end_user)
        meter.route = resolve_route(snapshot, key, chat.model)
        chat = await _admit_chat(request, runtime, snapshot, key, meter, chat)
        cache = await _cache_lookup(request, runtime, key, meter, chat)
        if (hit := cache.hit) is not None:
            if not chat.stream:
                return Response(
                    status=200, body=hit.body, headers=_hit_headers(request, hit, meter)
                )
            replay = stream_from_completion(hit.body, include_usage=chat.include_usage)
            return StreamingResponse(
                status=200, first_chunk=replay, chunks=_nothing_more(),
                headers=_hit_headers(request, hit, meter),
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
    meter.keep_response(served.body)
    meter.record(outcome=Outcome.SUCCESS, status_code=200, usage=served.usage)
    if cache.entry_key is not None:
        # In the background: a slow or hung Redis must not hold the answer back.
        runtime.spawn(_cache_store(runtime, meter, cache.entry_key, served))
    return Response(status=200, body=served.body, headers=headers)


async def _relay(stream: UpstreamStream, meter: Meter) -> AsyncIterator[bytes]:
    """Forward stream events as they arrive; bill what was produced, however it ends.

    A failure before the first event is raised (the client still gets a status
    code); after it, the stream ends with an error event instead.
    """
    failure: GatewayError | None = None
    disconnected = started = answered = False
    capture = meter.response_capture  # None unless the org logs bodies
    try:
        async for chunk in stream.events():
            meter.first_byte_sent()
            started = True
            if capture is not None:
                capture.add(chunk)
            yield chunk
            # Every token has been sent: the SDKs hang up on `[DONE]`, often before the
            # upstream body has ended, and that is no disconnect. (On /v1/messages the
            # client's `message_stop` follows the relay's end; leaving just before it
            # counts as served too.)
            answered = chunk.endswith(b"[DONE]\n\n")
    except GatewayError as exc:
        failure = exc
        if not started:
            raise
        # The SDKs raise on an error event, so the client never mistakes this for an answer.
        error_event = b"data: " + exc.openai_body() + b"\n\n"
        if capture is not None:
            capture.add(error_event)
        yield error_event
    except (asyncio.CancelledError, GeneratorExit):
        disconnected = True
        raise
    finally:
        await stream.aclose()
        if failure is not None and not started:
            pass  # not answered yet: the caller fails over, or records the failure
        elif failure is not None:
            meter.record_failure(failure, usage=stream.usage)
        elif disconnected and not answered:
            meter.record(
                outcome=Outcome.CLIENT_ERROR,
                status_code=499,
                usage=stream.usage,
                error_class="client_disconnected",
            )
        else:
            meter.record(outcome=Outcome.SUCCESS, status_code=200, usage=stream.usage)


async def messages(
    request: ProxyRequest, runtime: ProxyRuntime, snapshot: ConfigSnapshot, key: KeyContext
) -> Response | StreamingResponse:
    """POST /v1/messages (Anthropic format), served by whichever provider the route names."""
    meter = _metered(request, runtime, snapshot, key, "messages")
    try:
        chat = parse_messages_request(request.body)
        meter.model, meter.is_stream = chat.model, chat.stream
        meter.end_user = end_user_of(chat.payload, meter.end_user)
        meter.route = resolve_route(snapshot, key, chat.model)
        chat = await _admit_chat(request, runtime, snapshot, key, meter, chat)
        cache = await _cache_lookup(request, runtime, key, meter, chat)
        if (hit := cache.hit) is not None:
            headers = _hit_headers(request, hit, meter)
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
    body = message_from_completion(served.body, served.usage)
    meter.keep_response(body)
    meter.record(outcome=Outcome.SUCCESS, status_code=200, usage=served.usage)
    if cache.entry_key is not None:
        # In the background: a slow or hung Redis must not hold the answer back.
        runtime.spawn(_cache_store(runtime, meter, cache.entry_key, served))
    return Response(status=200, body=body, headers=headers)


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


async def embeddings(
    request: ProxyRequest, runtime: ProxyRuntime, snapshot: ConfigSnapshot, key: KeyContext
) -> Response:
    """POST /v1/embeddings (OpenAI format)."""
    meter = _metered(request, runtime, snapshot, key, "embeddings")
    try:
        embedding_request = parse_embeddings_request(request.body)
        meter.model = embedding_request.model
        meter.end_user = end_user_of(embedding_request.payload, meter.end_user)
        meter.route = resolve_route(snapshot, key, embedding_request.model)
        if key.budgets or key.limits:
            embedded = embedding_request.payload.get("input")
            await _admit(
                request, runtime, snapshot, key, meter,
                input_ceiling=lambda: input_tokens_ceiling(embedded),
                output_tokens=0,
                estimate=lambda: estimate_input_tokens(embedded),
            )  # fmt: skip

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
            on_attempt_failed=meter.attempt_failed,
        )
    except GatewayError as exc:
        meter.record_failure(exc)
        raise
    meter.keep_response(reply.body)
    meter.record(outcome=Outcome.SUCCESS, status_code=200, usage=reply.usage)
    return Response(status=200, body=reply.body, headers=_served_headers(request, meter))


def _model_object(plan: RoutePlan, key: KeyContext) -> dict[str, object]:
    owner = key.org_slug if plan.org_id is not None else "tollgate"
    return {"id": plan.model_name, "object": "model", "created": plan.created, "owned_by": owner}


async def list_models(
    request: ProxyRequest, runtime: ProxyRuntime, snapshot: ConfigSnapshot, key: KeyContext
) -> Response:
    """GET /v1/models: only the models this key may call."""
    meter = _metered(request, runtime, snapshot, key, "models")
    data = [_model_object(plan, key) for plan in snapshot.plans_for(key)]
    meter.record(outcome=Outcome.SUCCESS, status_code=200)
    body = orjson.dumps({"object": "list", "data": data})
    return Response(status=200, body=body, headers={"x-request-id": request.request_id})


async def retrieve_model(
    request: ProxyRequest, runtime: ProxyRuntime, snapshot: ConfigSnapshot, key: KeyContext,
    model: str,
) -> Response:  # fmt: skip
    """GET /v1/models/{model}: 404 unless this key may call it."""
    meter = _metered(request, runtime, snapshot, key, "models")
    # From the URL: a name the ledger cannot store is recorded without it.
    meter.model = model if model_name_storable(model) else ""
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


async def key_info(
    request: ProxyRequest, runtime: ProxyRuntime, snapshot: ConfigSnapshot, key: KeyContext
) -> Response:
    """GET /v1/key/info: the calling key's own limits, budgets left and reset times."""
    meter = _metered(request, runtime, snapshot, key, "key.info")
    try:
        report = await key_limits_report(runtime.counters, key, request.started_at)
    except (RedisError, OSError, DatabaseError) as exc:  # DatabaseError: seeding from the ledger
        failure = LimitsUnavailable(
            "Budgets and rate limits cannot be read right now; retry shortly.",
            headers={"retry-after": "1"},
        )
        meter.record_failure(failure)
        raise failure from exc
    meter.record(outcome=Outcome.SUCCESS, status_code=200)
    return Response(
        status=200, body=orjson.dumps(report), headers={"x-request-id": request.request_id}
    )
