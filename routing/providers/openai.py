"""OpenAI and OpenAI-compatible hosts: the client's format is the provider's."""

from collections.abc import Callable
from typing import Any

import aiohttp

from billing.contracts import TokenUsage
from routing.contracts import ChatRequest, DeploymentSpec, EmbeddingsRequest
from routing.errors import UpstreamMalformed
from routing.providers.base import UpstreamReply, UpstreamStream
from routing.providers.upstream import (
    HTTPAdapter,
    SSEStream,
    json_object,
    read_body,
    sse_data_json,
    sse_json,
)
from routing.tokens import estimate_input_tokens, estimate_prompt_tokens, estimate_text_tokens

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


class OpenAIStream(SSEStream):
    """Relays OpenAI SSE events unchanged, reading usage from the final chunk.

    Each event is checked to be a JSON object before it is relayed: a malformed one
    ends the client's stream with an error event (the SDK raises an API error, not a
    decode error), and a stream that ends without `[DONE]` was cut short.
    """

    def __init__(
        self,
        response: aiohttp.ClientResponse,
        *,
        first_event_deadline: float,
        include_usage: bool,
        request_payload: dict[str, Any],
    ) -> None:
        super().__init__(response, first_event_deadline=first_event_deadline)
        self._include_usage = include_usage
        self._request_payload = request_payload
        self._usage: TokenUsage | None = None
        self._content_events = 0
        self._done = False

    @property
    def usage(self) -> TokenUsage:
        """The provider's figures once its usage chunk came, else an estimate so far."""
        if self._usage is not None:
            return self._usage
        # Cut short before the usage chunk, or a host that sends none: one content
        # event is about one token, and the prompt is estimated from the request.
        return TokenUsage(
            input_tokens=estimate_prompt_tokens(self._request_payload),
            output_tokens=self._content_events,
            estimated=True,
        )

    def _translate(self, events: list[bytes]) -> bytes:
        """The events unchanged, less a usage-only chunk the client did not ask for."""
        out = []
        for event in events:
            # The usual event is one `data: {...}` line; anything else takes the general path.
            if event.startswith(b"data: ") and b"\n" not in event:
                data = event[6:]
                if data == _DONE:
                    self._done = True
                    chunk = None
                else:
                    chunk = sse_data_json(data)
            elif event.replace(b" ", b"") == b"data:[DONE]":
                self._done = True
                chunk = None
            else:
                chunk = sse_json(event)  # None for a comment (a keep-alive)
                data = event
            if chunk is not None:
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

    def _closing(self) -> bytes:
        """Nothing more to send; raises UpstreamMalformed if `[DONE]` never came."""
        if not self._done:
            raise UpstreamMalformed("The upstream provider ended the stream before finishing.")
        return b""


def _completion_tokens(completion: dict[str, Any]) -> int:
    """Estimated output tokens of a chat.completion: message text and tool-call arguments."""
    tokens = 0
    choices = completion.get("choices")
    for choice in choices if isinstance(choices, list) else []:
        message = choice.get("message") if isinstance(choice, dict) else None
        if not isinstance(message, dict):
            continue
        if isinstance(message.get("content"), str):
            tokens += estimate_text_tokens(message["content"])
        calls = message.get("tool_calls")
        for call in calls if isinstance(calls, list) else []:
            function = call.get("function") if isinstance(call, dict) else None
            arguments = function.get("arguments") if isinstance(function, dict) else None
            if isinstance(arguments, str):
                tokens += estimate_text_tokens(arguments)
    return tokens


def _estimated_chat_usage(payload: dict[str, Any], completion: dict[str, Any]) -> TokenUsage:
    """Usage for a chat.completion sent without any: the prompt's and the answer's estimates."""
    return TokenUsage(
        input_tokens=estimate_prompt_tokens(payload),
        output_tokens=_completion_tokens(completion),
        estimated=True,
    )


def _estimated_embeddings_usage(payload: dict[str, Any], _answer: dict[str, Any]) -> TokenUsage:
    """Usage for embeddings sent without any: the estimate of the request's input."""
    return TokenUsage(input_tokens=estimate_input_tokens(payload.get("input")), estimated=True)


class OpenAIAdapter(HTTPAdapter):
    kind = "openai"

    def _url(self, deployment: DeploymentSpec, target: str) -> str:
        """The URL of the endpoint at `target` (like /chat/completions) for `deployment`."""
        return deployment.base_url + target

    def _credentials(self, api_key: str) -> dict[str, str]:
        return {"authorization": f"Bearer {api_key}"}

    async def _complete(
        self,
        deployment: DeploymentSpec,
        path: str,
        payload: dict[str, Any],
        *,
        request_id: str,
        estimate: Callable[[dict[str, Any], dict[str, Any]], TokenUsage],
    ) -> UpstreamReply:
        """The provider's answer unchanged, metered by its usage or else `estimate(payload, it)`."""
        body = await read_body(await self._post(deployment, path, payload, request_id=request_id))
        answer = json_object(body)
        usage = usage_from_openai(answer.get("usage")) or estimate(payload, answer)
        return UpstreamReply(body=body, usage=usage)

    async def chat(
        self, deployment: DeploymentSpec, chat: ChatRequest, *, request_id: str
    ) -> UpstreamReply:
        """The provider's chat.completion unchanged; usage estimated if it reports none."""
        payload = {**chat.payload, "model": deployment.upstream_model}
        return await self._complete(
            deployment,
            "/chat/completions",
            payload,
            request_id=request_id,
            estimate=_estimated_chat_usage,
        )

    async def chat_stream(
        self, deployment: DeploymentSpec, chat: ChatRequest, *, request_id: str
    ) -> UpstreamStream:
        """Open the provider's stream, relayed unchanged; returns once the provider accepted."""
        options = chat.payload.get("stream_options") or {}
        payload = {
            **chat.payload,
            "model": deployment.upstream_model,
            # Always ask for usage so streamed calls are metered exactly.
            "stream_options": {**options, "include_usage": True},
        }
        response, deadline = await self._open_stream(
            deployment, "/chat/completions", payload, request_id=request_id
        )
        return OpenAIStream(
            response,
            first_event_deadline=deadline,
            include_usage=chat.include_usage,
            request_payload=chat.payload,
        )

    async def embeddings(
        self, deployment: DeploymentSpec, request: EmbeddingsRequest, *, request_id: str
    ) -> UpstreamReply:
        """The provider's embeddings list unchanged; usage estimated if it reports none."""
        payload = {**request.payload, "model": deployment.upstream_model}
        return await self._complete(
            deployment,
            "/embeddings",
            payload,
            request_id=request_id,
            estimate=_estimated_embeddings_usage,
        )
