"""Google Gemini (generativelanguage API): OpenAI requests translated to generateContent."""

import asyncio
import base64
import struct
import time
from typing import Any, Final
from urllib.parse import quote

import aiohttp
import orjson

from billing.contracts import TokenUsage
from routing.contracts import ChatRequest, DeploymentSpec, EmbeddingsRequest
from routing.errors import InvalidRequest, UpstreamError, UpstreamMalformed, UpstreamRejected
from routing.providers.base import UpstreamReply, UpstreamStream
from routing.providers.gemini_format import (
    ChunkTranslator,
    chat_completion,
    generate_content_body,
)
from routing.providers.upstream import HTTPAdapter, TranslatedStream, client_errors_mapped
from routing.tokens import estimate_text_tokens

# batchEmbedContents takes at most this many texts per call.
_EMBED_BATCH: Final = 100
# Without alt=sse Gemini streams one JSON array, which cannot be read event by event.
_STREAM_METHOD: Final = "streamGenerateContent?alt=sse"
_INVALID_KEY_MESSAGE: Final = "API key not valid"


def _model_name(deployment: DeploymentSpec) -> str:
    """The model's resource name: `models/<id>` unless it already names a resource."""
    model = deployment.upstream_model
    return model if "/" in model else f"models/{model}"


def _embedding_texts(payload: dict[str, Any]) -> list[str]:
    """The texts to embed for an OpenAI embeddings payload; Gemini embeds text only."""
    value = payload.get("input")
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(item, str) for item in value):
        return list(value)
    raise InvalidRequest(
        "Gemini models embed text only: 'input' must be a string or an array of strings.",
        param="input",
    )


def _embed_body(texts: list[str], *, model_name: str, dimensions: object) -> dict[str, Any]:
    """A batchEmbedContents body for `texts` (`model_name` like models/<model>)."""
    requests = []
    for text in texts:
        request: dict[str, Any] = {"model": model_name, "content": {"parts": [{"text": text}]}}
        if isinstance(dimensions, int) and not isinstance(dimensions, bool):
            request["outputDimensionality"] = dimensions
        requests.append(request)
    return {"requests": requests}


def _embedding_vectors(response: object, *, expected: int) -> list[list[float]]:
    """The vectors of a batchEmbedContents response, checked to match the request."""
    embeddings = response.get("embeddings") if isinstance(response, dict) else None
    vectors = []
    for embedding in embeddings if isinstance(embeddings, list) else []:
        values = embedding.get("values") if isinstance(embedding, dict) else None
        if not isinstance(values, list) or not all(
            isinstance(value, int | float) and not isinstance(value, bool) for value in values
        ):
            break
        vectors.append(values)
    if len(vectors) != expected:
        raise UpstreamMalformed("The upstream provider sent a malformed embeddings response.")
    return vectors


def _embeddings_list(
    vectors: list[list[float]], texts: list[str], *, model: str, as_base64: bool
) -> tuple[dict[str, Any], TokenUsage]:
    """An OpenAI embeddings list and its estimated usage (Gemini reports none)."""
    data = []
    for index, vector in enumerate(vectors):
        encoded: object = vector
        if as_base64:
            # As OpenAI sends it: little-endian float32, base64.
            encoded = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
        data.append({"object": "embedding", "index": index, "embedding": encoded})
    tokens = sum(estimate_text_tokens(text) for text in texts)
    body = {
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }
    return body, TokenUsage(input_tokens=tokens, estimated=True)


class GeminiStream(TranslatedStream):
    """Translates Gemini SSE events into OpenAI chunks as they arrive."""

    _translator: ChunkTranslator

    def __init__(
        self,
        response: aiohttp.ClientResponse,
        *,
        translator: ChunkTranslator,
        include_usage: bool,
        first_event_deadline: float,
    ) -> None:
        super().__init__(response, translator=translator, first_event_deadline=first_event_deadline)
        self._include_usage = include_usage

    def _closing(self) -> bytes:
        """Open choices closed, usage if the client asked, and [DONE]; raises if unfinished."""
        return self._translator.closing(include_usage=self._include_usage)


class GeminiAdapter(HTTPAdapter):
    kind = "gemini"
    chat_params = frozenset(
        {
            "model",
            "messages",
            "stream",
            "stream_options",
            "temperature",
            "top_p",
            "max_tokens",
            "max_completion_tokens",
            "stop",
            "n",
            "seed",
            # End-user attribution is Tollgate's, not Gemini's: accepted and not sent.
            "user",
            "presence_penalty",
            "frequency_penalty",
            "response_format",
            "tools",
            "tool_choice",
        }
    )

    def _url(self, deployment: DeploymentSpec, target: str) -> str:
        """The URL of the model's `target` method (like generateContent) for `deployment`."""
        name = quote(_model_name(deployment), safe="/")
        return f"{deployment.base_url.rstrip('/')}/{name}:{target}"

    def _credentials(self, api_key: str) -> dict[str, str]:
        return {"x-goog-api-key": api_key}

    def _rejection(self, rejected: UpstreamRejected) -> UpstreamError:
        """A 400 naming an invalid API key is the gateway's credentials failure, not a 400."""
        # Gemini answers a bad key with 400, not 401: the gateway's fault, not the client's.
        if _INVALID_KEY_MESSAGE in rejected.message:
            return UpstreamError("The upstream provider refused the gateway's credentials.")
        return rejected

    async def chat(
        self, deployment: DeploymentSpec, chat: ChatRequest, *, request_id: str
    ) -> UpstreamReply:
        """A chat.completion translated from generateContent; blocked prompts are a 400."""
        body = generate_content_body(chat.payload)
        answer = await self._post_for_json(
            deployment, "generateContent", body, request_id=request_id
        )
        completion, usage = chat_completion(
            answer, model=deployment.upstream_model, created=int(time.time())
        )
        return UpstreamReply(body=orjson.dumps(completion), usage=usage)

    async def chat_stream(
        self, deployment: DeploymentSpec, chat: ChatRequest, *, request_id: str
    ) -> UpstreamStream:
        """Open streamGenerateContent (SSE); its events come out as OpenAI chunks."""
        body = generate_content_body(chat.payload)
        choices = chat.payload.get("n")
        translator = ChunkTranslator(
            model=deployment.upstream_model, choices=choices if isinstance(choices, int) else 1
        )
        response, deadline = await self._open_stream(
            deployment, _STREAM_METHOD, body, request_id=request_id
        )
        return GeminiStream(
            response,
            translator=translator,
            include_usage=chat.include_usage,
            first_event_deadline=deadline,
        )

    async def embeddings(
        self, deployment: DeploymentSpec, request: EmbeddingsRequest, *, request_id: str
    ) -> UpstreamReply:
        """Embeddings from batchEmbedContents; usage is estimated (Gemini reports none)."""
        texts = _embedding_texts(request.payload)
        name = _model_name(deployment)
        vectors: list[list[float]] = []
        with client_errors_mapped():
            # One deadline for the whole request, however many batches it takes.
            async with asyncio.timeout(deployment.total_timeout_s):
                for start in range(0, len(texts), _EMBED_BATCH):
                    batch = texts[start : start + _EMBED_BATCH]
                    body = _embed_body(
                        batch, model_name=name, dimensions=request.payload.get("dimensions")
                    )
                    answer = await self._post_for_json(
                        deployment, "batchEmbedContents", body, request_id=request_id
                    )
                    vectors.extend(_embedding_vectors(answer, expected=len(batch)))
        reply, usage = _embeddings_list(
            vectors,
            texts,
            model=deployment.upstream_model,
            as_base64=request.payload.get("encoding_format") == "base64",
        )
        return UpstreamReply(body=orjson.dumps(reply), usage=usage)
