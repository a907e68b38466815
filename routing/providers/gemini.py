"""Google Gemini (generativelanguage API): OpenAI requests translated to generateContent."""

import asyncio
import base64
import struct
import time
from collections.abc import AsyncIterator
from typing import Any, Final
from urllib.parse import quote

import aiohttp
import orjson

from billing.contracts import TokenUsage
from routing.contracts import ChatRequest, DeploymentSpec, EmbeddingsRequest
from routing.errors import InvalidRequest, UpstreamError, UpstreamMalformed, UpstreamRejected
from routing.providers.base import ProviderAdapter, UpstreamReply, UpstreamStream
from routing.providers.gemini_format import (
    ChunkTranslator,
    chat_completion,
    generate_content_body,
)
from routing.providers.upstream import (
    client_errors_mapped,
    raise_for_upstream_status,
    sse_event_batches,
)
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


class GeminiStream(UpstreamStream):
    """Translates Gemini SSE events into OpenAI chunks as they arrive."""

    def __init__(
        self,
        response: aiohttp.ClientResponse,
        *,
        translator: ChunkTranslator,
        include_usage: bool,
        first_event_deadline: float,
    ) -> None:
        self._response = response
        self._translator = translator
        self._include_usage = include_usage
        self._first_event_deadline = first_event_deadline
        self._complete = False

    @property
    def usage(self) -> TokenUsage:
        return self._translator.usage

    async def events(self) -> AsyncIterator[bytes]:
        batches = sse_event_batches(self._response.content)
        with client_errors_mapped():
            remaining_s = max(self._first_event_deadline - time.monotonic(), 0.001)
            first = b""
            async with asyncio.timeout(remaining_s):
                # Translated before anything is yielded, so a blocked prompt is still a 400.
                while not first:
                    batch = await anext(batches, None)
                    if batch is None:
                        raise UpstreamMalformed(
                            "The upstream provider closed the stream without data."
                        )
                    first = self._translator.translate_batch(batch)
            yield first
            async for batch in batches:
                translated = self._translator.translate_batch(batch)
                if translated:
                    yield translated
        closing = self._translator.closing(include_usage=self._include_usage)
        self._complete = True  # the upstream body was read to its end
        yield closing

    async def aclose(self) -> None:
        if self._complete:
            self._response.release()  # back to the pool
        else:
            self._response.close()  # cut short: the connection cannot be reused


class GeminiAdapter(ProviderAdapter):
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

    def _url(self, deployment: DeploymentSpec, method: str) -> str:
        name = quote(_model_name(deployment), safe="/")
        return f"{deployment.base_url.rstrip('/')}/{name}:{method}"

    def _headers(self, deployment: DeploymentSpec, request_id: str) -> dict[str, str]:
        headers = {"content-type": "application/json", "x-request-id": request_id}
        if deployment.api_key:
            headers["x-goog-api-key"] = deployment.api_key
        return headers

    async def _post(
        self,
        deployment: DeploymentSpec,
        method: str,
        body: dict[str, Any],
        *,
        request_id: str,
        client_timeout: aiohttp.ClientTimeout,
    ) -> aiohttp.ClientResponse:
        with client_errors_mapped():
            response = await self.session.post(
                self._url(deployment, method),
                data=orjson.dumps(body),
                headers=self._headers(deployment, request_id),
                timeout=client_timeout,
                allow_redirects=False,
            )
        try:
            await raise_for_upstream_status(response)
        except UpstreamRejected as exc:
            response.release()
            # Gemini answers a bad key with 400, not 401: the gateway's fault, not the client's.
            if _INVALID_KEY_MESSAGE in exc.message:
                raise UpstreamError(
                    "The upstream provider refused the gateway's credentials."
                ) from None
            raise
        except BaseException:
            response.release()
            raise
        return response

    async def _complete(
        self, deployment: DeploymentSpec, method: str, body: dict[str, Any], *, request_id: str
    ) -> object:
        """The provider's JSON answer to one non-streamed call."""
        # A non-streamed answer is silent until it is done: only the total
        # deadline applies, not the gap-between-chunks read timeout.
        timeout = aiohttp.ClientTimeout(
            total=deployment.total_timeout_s, sock_connect=deployment.connect_timeout_s
        )
        response = await self._post(
            deployment, method, body, request_id=request_id, client_timeout=timeout
        )
        try:
            with client_errors_mapped():
                raw = await response.read()
        finally:
            response.release()
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise UpstreamMalformed(
                "The upstream provider sent a response that is not JSON."
            ) from None

    async def chat(
        self, deployment: DeploymentSpec, chat: ChatRequest, *, request_id: str
    ) -> UpstreamReply:
        """A chat.completion translated from generateContent; blocked prompts are a 400."""
        body = generate_content_body(chat.payload)
        answer = await self._complete(deployment, "generateContent", body, request_id=request_id)
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
                    _STREAM_METHOD,
                    body,
                    request_id=request_id,
                    client_timeout=timeout,
                )
        return GeminiStream(
            response,
            translator=translator,
            include_usage=chat.include_usage,
            first_event_deadline=first_event_deadline,
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
                    answer = await self._complete(
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
