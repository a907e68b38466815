"""OpenAI and OpenAI-compatible hosts: the client's format is the provider's."""

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson

from billing.contracts import TokenUsage
from routing.contracts import ChatRequest, DeploymentSpec, EmbeddingsRequest
from routing.errors import UpstreamMalformed
from routing.providers.base import ProviderAdapter, UpstreamReply, UpstreamStream
from routing.providers.upstream import (
    client_errors_mapped,
    raise_for_upstream_status,
    sse_event_batches,
)

_DONE = b"[DONE]"


def usage_from_openai(data: Any) -> TokenUsage | None:
    """Token counts from an OpenAI `usage` object, or None if it is not one."""
    if not isinstance(data, dict):
        return None
    prompt = data.get("prompt_tokens")
    completion = data.get("completion_tokens", 0)
    if not isinstance(prompt, int) or not isinstance(completion, int):
        return None
    prompt_details = data.get("prompt_tokens_details") or {}
    completion_details = data.get("completion_tokens_details") or {}
    cached = prompt_details.get("cached_tokens") if isinstance(prompt_details, dict) else 0
    reasoning = (
        completion_details.get("reasoning_tokens") if isinstance(completion_details, dict) else 0
    )
    return TokenUsage(
        input_tokens=max(prompt, 0),
        output_tokens=max(completion, 0),
        cached_input_tokens=cached if isinstance(cached, int) and cached > 0 else 0,
        reasoning_tokens=reasoning if isinstance(reasoning, int) and reasoning > 0 else 0,
    )


class OpenAIStream(UpstreamStream):
    """Relays OpenAI SSE events unchanged, reading usage from the final chunk."""

    def __init__(
        self, response: aiohttp.ClientResponse, *, include_usage: bool, first_event_deadline: float
    ) -> None:
        self._response = response
        self._include_usage = include_usage
        self._first_event_deadline = first_event_deadline
        self._usage: TokenUsage | None = None
        self._content_events = 0
        self._complete = False

    @property
    def usage(self) -> TokenUsage:
        if self._usage is not None:
            return self._usage
        # Cut short before the usage chunk: one content event is about one token.
        return TokenUsage(output_tokens=self._content_events, estimated=True)

    async def events(self) -> AsyncIterator[bytes]:
        batches = sse_event_batches(self._response.content)
        with client_errors_mapped():
            remaining_s = max(self._first_event_deadline - time.monotonic(), 0.001)
            async with asyncio.timeout(remaining_s):
                first = await anext(batches, None)
            if first is None:
                raise UpstreamMalformed("The upstream provider closed the stream without data.")
            yield self._relay(first)
            async for batch in batches:
                relayed = self._relay(batch)
                if relayed:
                    yield relayed
        self._complete = True

    def _relay(self, events: list[bytes]) -> bytes:
        out = []
        for event in events:
            data = event[6:] if event.startswith(b"data: ") else None
            if data is not None and data != _DONE:
                if b'"usage":{' in data or b'"usage": {' in data:
                    chunk = _loads_or_none(data) or {}
                    usage = usage_from_openai(chunk.get("usage"))
                    if usage is not None:
                        self._usage = usage
                        # Tollgate always asks for usage; only clients that did see it.
                        if not self._include_usage and not chunk.get("choices"):
                            continue
                elif b'"content":"' in data and b'"content":""' not in data:
                    self._content_events += 1
            out.append(event)
            out.append(b"\n\n")
        return b"".join(out)

    async def aclose(self) -> None:
        if self._complete:
            self._response.release()  # back to the pool
        else:
            self._response.close()  # cut short: the connection cannot be reused


def _loads_or_none(data: bytes) -> dict[str, Any] | None:
    try:
        parsed = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    return parsed if isinstance(parsed, dict) else None


class OpenAIAdapter(ProviderAdapter):
    kind = "openai"

    def _url(self, deployment: DeploymentSpec, path: str) -> str:
        """The URL of the endpoint at `path` (like /chat/completions) for `deployment`."""
        return deployment.base_url + path

    def _headers(self, deployment: DeploymentSpec, request_id: str) -> dict[str, str]:
        headers = {"content-type": "application/json", "x-request-id": request_id}
        if deployment.api_key:
            headers["authorization"] = f"Bearer {deployment.api_key}"
        return headers

    async def _post(
        self,
        deployment: DeploymentSpec,
        path: str,
        payload: dict[str, Any],
        *,
        request_id: str,
        client_timeout: aiohttp.ClientTimeout,
    ) -> aiohttp.ClientResponse:
        with client_errors_mapped():
            response = await self.session.post(
                self._url(deployment, path),
                data=orjson.dumps(payload),
                headers=self._headers(deployment, request_id),
                timeout=client_timeout,
                allow_redirects=False,
            )
        try:
            await raise_for_upstream_status(response)
        except BaseException:
            response.release()
            raise
        return response

    async def _complete(
        self,
        deployment: DeploymentSpec,
        path: str,
        payload: dict[str, Any],
        *,
        request_id: str,
    ) -> UpstreamReply:
        # A non-streamed answer is silent until it is done: only the total
        # deadline applies, not the gap-between-chunks read timeout.
        timeout = aiohttp.ClientTimeout(
            total=deployment.total_timeout_s, sock_connect=deployment.connect_timeout_s
        )
        response = await self._post(
            deployment, path, payload, request_id=request_id, client_timeout=timeout
        )
        try:
            with client_errors_mapped():
                body = await response.read()
        finally:
            response.release()
        data = _loads_or_none(body)
        if data is None:
            raise UpstreamMalformed("The upstream provider sent a response that is not JSON.")
        usage = usage_from_openai(data.get("usage"))
        return UpstreamReply(body=body, usage=usage or TokenUsage(estimated=True))

    async def chat(
        self, deployment: DeploymentSpec, chat: ChatRequest, *, request_id: str
    ) -> UpstreamReply:
        payload = {**chat.payload, "model": deployment.upstream_model}
        return await self._complete(deployment, "/chat/completions", payload, request_id=request_id)

    async def chat_stream(
        self, deployment: DeploymentSpec, chat: ChatRequest, *, request_id: str
    ) -> UpstreamStream:
        options = chat.payload.get("stream_options") or {}
        payload = {
            **chat.payload,
            "model": deployment.upstream_model,
            # Always ask for usage so streamed calls are metered exactly.
            "stream_options": {**options, "include_usage": True},
        }
        first_event_deadline = time.monotonic() + deployment.ttft_timeout_s
        timeout = aiohttp.ClientTimeout(
            total=deployment.total_timeout_s,
            sock_connect=deployment.connect_timeout_s,
            sock_read=deployment.read_timeout_s,
        )
        with client_errors_mapped():
            async with asyncio.timeout(deployment.ttft_timeout_s):
                response = await self._post(
                    deployment,
                    "/chat/completions",
                    payload,
                    request_id=request_id,
                    client_timeout=timeout,
                )
        return OpenAIStream(
            response, include_usage=chat.include_usage, first_event_deadline=first_event_deadline
        )

    async def embeddings(
        self, deployment: DeploymentSpec, request: EmbeddingsRequest, *, request_id: str
    ) -> UpstreamReply:
        payload = {**request.payload, "model": deployment.upstream_model}
        return await self._complete(deployment, "/embeddings", payload, request_id=request_id)
