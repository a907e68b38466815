"""Anthropic's Messages API, translated to and from the gateway's OpenAI format."""

import time
from typing import Final

from routing.contracts import ChatRequest, DeploymentSpec, EmbeddingsRequest
from routing.errors import UpstreamRejected
from routing.providers.anthropic_format import ChunkTranslator, chat_completion, messages_body
from routing.providers.base import UpstreamReply, UpstreamStream
from routing.providers.upstream import HTTPAdapter, TranslatedStream

ANTHROPIC_VERSION: Final = "2023-06-01"
_MESSAGES: Final = "/v1/messages"


class AnthropicAdapter(HTTPAdapter):
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

    def _url(self, deployment: DeploymentSpec, target: str) -> str:
        # Anthropic's base URL has no /v1; tolerate one so a pasted OpenAI-style URL works.
        return deployment.base_url.rstrip("/").removesuffix("/v1") + target

    def _credentials(self, api_key: str) -> dict[str, str]:
        return {"x-api-key": api_key}

    def _headers(self, deployment: DeploymentSpec, request_id: str) -> dict[str, str]:
        """The shared headers plus the Messages API version this translation speaks."""
        return {**super()._headers(deployment, request_id), "anthropic-version": ANTHROPIC_VERSION}

    async def chat(
        self, deployment: DeploymentSpec, chat: ChatRequest, *, request_id: str
    ) -> UpstreamReply:
        """A chat.completion translated from Anthropic's Message; raises UpstreamError."""
        body = messages_body(chat.payload, model=deployment.upstream_model, stream=False)
        message = await self._post_for_json(deployment, _MESSAGES, body, request_id=request_id)
        completion, usage = chat_completion(message, created=int(time.time()))
        return UpstreamReply(body=completion, usage=usage)

    async def chat_stream(
        self, deployment: DeploymentSpec, chat: ChatRequest, *, request_id: str
    ) -> UpstreamStream:
        """Open a Messages stream relayed as OpenAI chunks; returns once Anthropic accepted."""
        body = messages_body(chat.payload, model=deployment.upstream_model, stream=True)
        response, deadline = await self._open_stream(
            deployment, _MESSAGES, body, request_id=request_id
        )
        return TranslatedStream(
            response,
            translator=ChunkTranslator(include_usage=chat.include_usage),
            first_event_deadline=deadline,
        )

    async def embeddings(
        self, deployment: DeploymentSpec, request: EmbeddingsRequest, *, request_id: str
    ) -> UpstreamReply:
        """Always raises UpstreamRejected (400): Anthropic has no embeddings API."""
        raise UpstreamRejected(
            "Anthropic does not offer embeddings; route this model to an embeddings provider."
        )
