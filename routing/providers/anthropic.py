"""Anthropic's Messages API, translated to and from the gateway's OpenAI format."""

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any, Final

import aiohttp
import orjson

from billing.contracts import TokenUsage
from routing.contracts import ChatRequest, DeploymentSpec, EmbeddingsRequest
from routing.errors import UpstreamMalformed, UpstreamRejected
from routing.providers.anthropic_format import ChunkTranslator, chat_completion, messages_body
from routing.providers.base import ProviderAdapter, UpstreamReply, UpstreamStream
from routing.providers.upstream import (
    client_errors_mapped,
    raise_for_upstream_status,
    sse_event_batches,
)

ANTHROPIC_VERSION: Final = "2023-06-01"


class AnthropicStream(UpstreamStream):
    """Translates Anthropic's Messages events into OpenAI chunks as they arrive."""

    def __init__(
        self,
        response: aiohttp.ClientResponse,
        *,
        translator: ChunkTranslator,
        first_event_deadline: float,
    ) -> None:
        self._response = response
        self._translator = translator
        self._first_event_deadline = first_event_deadline
        self._complete = False

    @property
    def usage(self) -> TokenUsage:
        return self._translator.usage

    async def events(self) -> AsyncIterator[bytes]:
        batches = sse_event_batches(self._response.content)
        with client_errors_mapped():
            remaining_s = max(self._first_event_deadline - time.monotonic(), 0.001)
            async with asyncio.timeout(remaining_s):
                first = await anext(batches, None)
            if first is None:
                raise UpstreamMalformed("The upstream provider closed the stream without data.")
            translated = self._translator.translate_batch(first)
            if translated:
                yield translated
            async for batch in batches:
                translated = self._translator.translate_batch(batch)
                if translated:
                    yield translated
        if not self._translator.finished:
            # Without message_stop the client would never get its finish chunk or [DONE].
            raise UpstreamMalformed("The upstream provider ended the stream before finishing.")
        self._complete = True

    async def aclose(self) -> None:
        if self._complete:
            self._response.release()  # back to the pool
        else:
            self._response.close()  # cut short: the connection cannot be reused


class AnthropicAdapter(ProviderAdapter):
    kind = "anthropic"
    chat_params = frozenset(
        {
            "model",
            "messages",
            "stream",
            "stream_options",
            "max_tokens",
            "max_completion_tokens",
            "temperature",
            "top_p",
            "stop",
            "tools",
            "tool_choice",
            "parallel_tool_calls",
            "user",
            "n",
            # OpenAI's metadata only tags stored completions; Anthropic's takes user_id only.
            "metadata",
        }
    )

    def _url(self, deployment: DeploymentSpec) -> str:
        # Anthropic's base URL has no /v1; tolerate one so a pasted OpenAI-style URL works.
        return deployment.base_url.rstrip("/").removesuffix("/v1") + "/v1/messages"

    def _headers(self, deployment: DeploymentSpec, request_id: str) -> dict[str, str]:
        headers = {
            "content-type": "application/json",
            "anthropic-version": ANTHROPIC_VERSION,
            "x-request-id": request_id,
        }
        if deployment.api_key:
            headers["x-api-key"] = deployment.api_key
        return headers

    async def _post(
        self,
        deployment: DeploymentSpec,
        body: dict[str, Any],
        *,
        request_id: str,
        client_timeout: aiohttp.ClientTimeout,
    ) -> aiohttp.ClientResponse:
        with client_errors_mapped():
            response = await self.session.post(
                self._url(deployment),
                data=orjson.dumps(body),
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

    async def chat(
        self, deployment: DeploymentSpec, chat: ChatRequest, *, request_id: str
    ) -> UpstreamReply:
        """A chat.completion translated from Anthropic's Message; raises UpstreamError."""
        body = messages_body(chat.payload, model=deployment.upstream_model, stream=False)
        # A non-streamed answer is silent until it is done: only the total
        # deadline applies, not the gap-between-chunks read timeout.
        timeout = aiohttp.ClientTimeout(
            total=deployment.total_timeout_s, sock_connect=deployment.connect_timeout_s
        )
        response = await self._post(deployment, body, request_id=request_id, client_timeout=timeout)
        try:
            with client_errors_mapped():
                raw = await response.read()
        finally:
            response.release()
        try:
            message = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise UpstreamMalformed(
                "The upstream provider sent a response that is not JSON."
            ) from None
        completion, usage = chat_completion(message, created=int(time.time()))
        return UpstreamReply(body=completion, usage=usage)

    async def chat_stream(
        self, deployment: DeploymentSpec, chat: ChatRequest, *, request_id: str
    ) -> UpstreamStream:
        """Open a Messages stream relayed as OpenAI chunks; returns once Anthropic accepted."""
        body = messages_body(chat.payload, model=deployment.upstream_model, stream=True)
        first_event_deadline = time.monotonic() + deployment.ttft_timeout_s
        timeout = aiohttp.ClientTimeout(
            total=deployment.total_timeout_s,
            sock_connect=deployment.connect_timeout_s,
            sock_read=deployment.read_timeout_s,
        )
        with client_errors_mapped():
            async with asyncio.timeout(deployment.ttft_timeout_s):
                response = await self._post(
                    deployment, body, request_id=request_id, client_timeout=timeout
                )
        return AnthropicStream(
            response,
            translator=ChunkTranslator(include_usage=chat.include_usage),
            first_event_deadline=first_event_deadline,
        )

    async def embeddings(
        self, deployment: DeploymentSpec, request: EmbeddingsRequest, *, request_id: str
    ) -> UpstreamReply:
        """Always raises UpstreamRejected (400): Anthropic has no embeddings API."""
        raise UpstreamRejected(
            "Anthropic does not offer embeddings; route this model to an embeddings provider."
        )
