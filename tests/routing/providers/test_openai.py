"""The OpenAI adapter's metering: the provider's usage when sent, an estimate when not."""

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest
import pytest_asyncio
from aiohttp import web

from billing.contracts import TokenUsage
from routing.contracts import ChatRequest, DeploymentSpec, EmbeddingsRequest
from routing.providers.openai import OpenAIAdapter
from routing.tokens import estimate_input_tokens, estimate_prompt_tokens, estimate_text_tokens

PROMPT = [{"role": "user", "content": "Tell me about the mountains"}]
# The mock counts words plus 3 tokens of framing per message.
PROMPT_TOKENS = 5 + 3
ANSWER = "The mountains are tall and old."
ARGUMENTS = '{"query": "highest peaks"}'
STREAMED_WORDS = ["The ", "mountains ", "are ", "tall."]
SENT = web.AppKey("sent", list[dict[str, Any]])  # request bodies the host received


def _sse(data: dict[str, Any] | str) -> bytes:
    return b"data: " + (data.encode() if isinstance(data, str) else orjson.dumps(data)) + b"\n\n"


def _chunk(delta: dict[str, Any], reason: str | None = None) -> dict[str, Any]:
    choice = {"index": 0, "delta": delta, "finish_reason": reason}
    return {"id": "c-1", "object": "chat.completion.chunk", "model": "m", "choices": [choice]}


# A host that never reports usage, streamed or not (some OpenAI-compatible servers).
COMPLETION = {
    "id": "c-1",
    "object": "chat.completion",
    "created": 1,
    "model": "m",
    "choices": [
        {
            "index": 0,
            "message": {
                "role": "assistant",
                "content": ANSWER,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "search", "arguments": ARGUMENTS},
                    }
                ],
            },
            "finish_reason": "tool_calls",
        }
    ],
}
STREAM = b"".join(
    [
        _sse(_chunk({"role": "assistant", "content": ""})),
        *(_sse(_chunk({"content": word})) for word in STREAMED_WORDS),
        _sse(_chunk({}, "stop")),
        _sse("[DONE]"),
    ]
)
EMBEDDINGS = {
    "object": "list",
    "data": [{"object": "embedding", "index": 0, "embedding": [0.5, 0.25]}],
    "model": "e",
}


async def _chat_without_usage(request: web.Request) -> web.StreamResponse:
    request.app[SENT].append(await request.json())
    if not request.app[SENT][-1].get("stream"):
        return web.json_response(COMPLETION)
    response = web.StreamResponse(headers={"content-type": "text/event-stream"})
    await response.prepare(request)
    await response.write(STREAM)
    await response.write_eof()
    return response


async def _embeddings_without_usage(request: web.Request) -> web.Response:
    request.app[SENT].append(await request.json())
    return web.json_response(EMBEDDINGS)


@pytest_asyncio.fixture
async def usageless_host() -> AsyncIterator[tuple[str, list[dict[str, Any]]]]:
    """The base URL of a tiny OpenAI-compatible host that sends no usage, and what it received."""
    app = web.Application()
    app[SENT] = sent = []
    app.router.add_post("/v1/chat/completions", _chat_without_usage)
    app.router.add_post("/v1/embeddings", _embeddings_without_usage)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    yield f"http://{host}:{port}/v1", sent
    await runner.cleanup()


@pytest_asyncio.fixture
async def adapter() -> AsyncIterator[OpenAIAdapter]:
    async with aiohttp.ClientSession() as session:
        yield OpenAIAdapter(session)


def deployment_for(base_url: str, model: str = "m") -> DeploymentSpec:
    return DeploymentSpec(
        deployment_id=1,
        name="openai-deployment",
        provider_id=1,
        provider_kind="openai",
        base_url=base_url,
        api_key="sk-test",
        api_version="",
        upstream_model=model,
        weight=1,
        priority=0,
        connect_timeout_s=5.0,
        ttft_timeout_s=10.0,
        read_timeout_s=10.0,
        total_timeout_s=30.0,
    )


def chat_for(*, stream: bool = False) -> ChatRequest:
    payload: dict[str, Any] = {"model": "m", "messages": PROMPT}
    if stream:
        payload["stream"] = True
    return ChatRequest(model="m", payload=payload, stream=stream, include_usage=False)


async def read_all(stream: Any) -> bytes:
    try:
        return b"".join([batch async for batch in stream.events()])
    finally:
        await stream.aclose()


@pytest.mark.asyncio
async def test_reported_usage_is_metered_exactly(adapter: OpenAIAdapter, mock_url: str) -> None:
    deployment = deployment_for(mock_url, "mock-small+tokens=4")

    reply = await adapter.chat(deployment, chat_for(), request_id="r")
    stream = await adapter.chat_stream(deployment, chat_for(stream=True), request_id="r")
    await read_all(stream)

    assert reply.usage == TokenUsage(input_tokens=PROMPT_TOKENS, output_tokens=4)
    assert stream.usage == TokenUsage(input_tokens=PROMPT_TOKENS, output_tokens=4)


@pytest.mark.asyncio
async def test_answer_without_usage_is_estimated_from_prompt_reply_and_tool_calls(
    adapter: OpenAIAdapter, usageless_host: tuple[str, list[dict[str, Any]]]
) -> None:
    base_url, _ = usageless_host
    chat = chat_for()

    reply = await adapter.chat(deployment_for(base_url), chat, request_id="r")

    assert orjson.loads(reply.body) == COMPLETION  # relayed as sent, no usage added
    assert reply.usage == TokenUsage(
        input_tokens=estimate_prompt_tokens(chat.payload),
        output_tokens=estimate_text_tokens(ANSWER) + estimate_text_tokens(ARGUMENTS),
        estimated=True,
    )
    assert reply.usage.input_tokens > 0 and reply.usage.output_tokens > 0


@pytest.mark.asyncio
async def test_stream_without_usage_chunk_estimates_the_prompt_and_counts_content_events(
    adapter: OpenAIAdapter, usageless_host: tuple[str, list[dict[str, Any]]]
) -> None:
    base_url, sent = usageless_host
    chat = chat_for(stream=True)

    stream = await adapter.chat_stream(deployment_for(base_url), chat, request_id="r")
    relayed = await read_all(stream)

    assert sent[-1]["stream_options"] == {"include_usage": True}  # asked, never answered
    assert relayed == STREAM
    assert stream.usage == TokenUsage(
        input_tokens=estimate_prompt_tokens(chat.payload),
        output_tokens=len(STREAMED_WORDS),
        estimated=True,
    )
    assert stream.usage.input_tokens > 0


@pytest.mark.asyncio
async def test_embeddings_without_usage_estimate_the_input(
    adapter: OpenAIAdapter, usageless_host: tuple[str, list[dict[str, Any]]]
) -> None:
    base_url, _ = usageless_host
    texts = ["alpha beta gamma", "delta"]
    request = EmbeddingsRequest(model="e", payload={"model": "e", "input": texts})

    reply = await adapter.embeddings(deployment_for(base_url, "e"), request, request_id="r")

    assert orjson.loads(reply.body) == EMBEDDINGS
    assert reply.usage == TokenUsage(input_tokens=estimate_input_tokens(texts), estimated=True)
    assert reply.usage.input_tokens > 0
