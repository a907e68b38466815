"""Every adapter against responses shaped exactly like its provider's documented examples.

A tiny server replays the files in tests/fixtures/providers: the first path
segment of the deployment's base URL names the file, the second the status.
"""

import json
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from routing.contracts import ChatRequest, DeploymentSpec
from routing.errors import (
    InvalidRequest,
    UpstreamError,
    UpstreamRateLimited,
    UpstreamRejected,
)
from routing.providers import ADAPTERS
from routing.providers.base import ProviderAdapter

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "providers"
SECRET = "sk-upstream-fixture-secret"
HELLO = {"model": "m", "messages": [{"role": "user", "content": "Hello"}]}


async def replay(request: web.Request) -> web.StreamResponse:
    name, status = request.match_info["fixture"], int(request.match_info["status"])
    body = (FIXTURES / name).read_bytes()
    content_type = "text/event-stream" if name.endswith(".sse") else "application/json"
    return web.Response(status=status, body=body, content_type=content_type)


@pytest_asyncio.fixture
async def fixture_server() -> AsyncIterator[str]:
    app = web.Application()
    app.router.add_route("*", "/{fixture}/{status}/{rest:.*}", replay)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield f"http://127.0.0.1:{port}"
    await runner.cleanup()


def deployment(root: str, kind: str, fixture: str, status: int = 200) -> DeploymentSpec:
    suffix = "/v1beta" if kind == "gemini" else ""
    return DeploymentSpec(
        deployment_id=1, name="d", provider_id=1, provider_kind=kind,
        base_url=f"{root}/{fixture}/{status}{suffix}", api_key=SECRET,
        api_version="2024-10-21" if kind == "azure" else "", upstream_model="m", weight=1,
        priority=0, connect_timeout_s=2, ttft_timeout_s=5, read_timeout_s=5, total_timeout_s=10,
    )  # fmt: skip


def adapter(kind: str, session: aiohttp.ClientSession) -> ProviderAdapter:
    return ADAPTERS[kind](session)


def chat(stream: bool = False) -> ChatRequest:
    return ChatRequest(model="m", payload={**HELLO, "stream": stream}, stream=stream,
                       include_usage=False)  # fmt: skip


async def complete(root, session, kind, fixture, status=200) -> ChatCompletion:
    reply = await adapter(kind, session).chat(
        deployment(root, kind, fixture, status), chat(), request_id="r"
    )
    completion = ChatCompletion.model_validate_json(reply.body)
    return completion, reply.usage


async def stream_through(root, session, kind, fixture):
    stream = await adapter(kind, session).chat_stream(
        deployment(root, kind, fixture), chat(stream=True), request_id="r"
    )
    chunks = []
    try:
        async for data in stream.events():
            for event in data.split(b"\n\n"):
                if event.startswith(b"data: ") and event != b"data: [DONE]":
                    chunks.append(ChatCompletionChunk.model_validate_json(event[6:]))
    finally:
        await stream.aclose()
    return chunks, stream


def text_of(chunks: list[ChatCompletionChunk]) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def arguments_of(chunks: list[ChatCompletionChunk]) -> dict:
    deltas = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or []]
    return json.loads("".join(d.function.arguments or "" for d in deltas))


# ------------------------------------------------------------------ OpenAI and Azure


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("kind", "fixture", "expected"),
    [
        ("openai", "openai_chat.json", (19, 0, 10, 0)),
        ("openai", "openai_chat_reasoning_cached.json", (2006, 1920, 300, 256)),
        ("azure", "azure_chat.json", (58, 0, 39, 0)),
    ],
)
async def test_openai_family_answers_keep_their_usage(
    fixture_server, session, kind, fixture, expected
) -> None:
    completion, usage = await complete(fixture_server, session, kind, fixture)
    assert completion.choices[0].message.content
    got = (usage.input_tokens, usage.cached_input_tokens, usage.output_tokens,
           usage.reasoning_tokens)  # fmt: skip
    assert got == expected


@pytest.mark.asyncio
async def test_openai_tool_call_passes_through(fixture_server, session) -> None:
    completion, _ = await complete(fixture_server, session, "openai", "openai_tool_call.json")
    (call,) = completion.choices[0].message.tool_calls
    assert json.loads(call.function.arguments) == {"location": "Boston, MA"}


@pytest.mark.asyncio
async def test_openai_stream_hides_the_usage_chunk_but_meters_it(fixture_server, session) -> None:
    chunks, stream = await stream_through(
        fixture_server, session, "openai", "openai_chat_stream.sse"
    )
    assert text_of(chunks) == "Hello!"
    assert all(chunk.usage is None for chunk in chunks)
    assert (stream.usage.input_tokens, stream.usage.output_tokens) == (9, 2)


@pytest.mark.asyncio
async def test_openai_errors_map_without_leaking_the_key(fixture_server, session) -> None:
    with pytest.raises(UpstreamError) as refused:
        await complete(fixture_server, session, "openai", "openai_error_invalid_key.json", 401)
    assert refused.value.status == 502 and refused.value.retryable
    assert "sk-proj" not in refused.value.message and SECRET not in refused.value.message
    with pytest.raises(UpstreamRejected) as too_long:
        await complete(fixture_server, session, "openai", "openai_error_context_length.json", 400)
    assert too_long.value.status == 400
    assert "maximum context length" in too_long.value.message
    assert fixture_server not in too_long.value.message


# ------------------------------------------------------------------ Anthropic


@pytest.mark.asyncio
async def test_anthropic_message_counts_cache_reads_in_the_prompt(fixture_server, session) -> None:
    completion, usage = await complete(
        fixture_server, session, "anthropic", "anthropic_message.json"
    )
    assert completion.choices[0].message.content == "Hi! My name is Claude."
    assert completion.choices[0].finish_reason == "stop"
    assert (usage.input_tokens, usage.cached_input_tokens, usage.output_tokens) == (3895, 1800, 503)
    assert completion.usage.prompt_tokens == 3895


@pytest.mark.asyncio
async def test_anthropic_tool_use_becomes_a_tool_call(fixture_server, session) -> None:
    completion, _ = await complete(fixture_server, session, "anthropic", "anthropic_tool_use.json")
    message = completion.choices[0].message
    assert completion.choices[0].finish_reason == "tool_calls"
    assert message.content == "I'll check the current weather in San Francisco for you."
    (call,) = message.tool_calls
    assert call.id == "toolu_01A09q90qw90lq917835lq9" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {
        "location": "San Francisco, CA",
        "unit": "celsius",
    }


@pytest.mark.asyncio
async def test_anthropic_streams_translate_text_and_tool_calls(fixture_server, session) -> None:
    chunks, stream = await stream_through(
        fixture_server, session, "anthropic", "anthropic_stream.sse"
    )
    assert text_of(chunks) == "Hello!"
    assert (stream.usage.input_tokens, stream.usage.output_tokens) == (25, 15)

    chunks, stream = await stream_through(
        fixture_server, session, "anthropic", "anthropic_tool_use_stream.sse"
    )
    assert text_of(chunks) == "Okay, let's check the weather for San Francisco, CA:"
    assert arguments_of(chunks) == {"location": "San Francisco, CA", "unit": "fahrenheit"}
    finish = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finish == ["tool_calls"]
    assert (stream.usage.input_tokens, stream.usage.output_tokens) == (472, 89)


@pytest.mark.asyncio
async def test_anthropic_overload_mid_stream_raises_after_the_text_so_far(
    fixture_server, session
) -> None:
    stream = await adapter("anthropic", session).chat_stream(
        deployment(fixture_server, "anthropic", "anthropic_stream_overloaded.sse"),
        chat(stream=True),
        request_id="r",
    )
    received = b""
    with pytest.raises(UpstreamError) as overloaded:
        async for data in stream.events():
            received += data
    await stream.aclose()
    assert b"Hello" in received
    assert overloaded.value.retryable
    assert stream.usage.output_tokens >= 1


@pytest.mark.asyncio
async def test_anthropic_529_is_a_retryable_gateway_error(fixture_server, session) -> None:
    with pytest.raises(UpstreamError) as overloaded:
        await complete(fixture_server, session, "anthropic", "anthropic_error_overloaded.json", 529)
    assert overloaded.value.status == 502 and overloaded.value.retryable


# ------------------------------------------------------------------ Gemini


@pytest.mark.asyncio
async def test_gemini_answer_counts_thoughts_as_output(fixture_server, session) -> None:
    completion, usage = await complete(
        fixture_server, session, "gemini", "gemini_generate_content.json"
    )
    assert completion.choices[0].message.content.startswith("AI learns patterns")
    assert (usage.input_tokens, usage.output_tokens, usage.reasoning_tokens) == (8, 41, 29)


@pytest.mark.asyncio
async def test_gemini_function_call_becomes_a_tool_call(fixture_server, session) -> None:
    completion, _ = await complete(fixture_server, session, "gemini", "gemini_function_call.json")
    (call,) = completion.choices[0].message.tool_calls
    assert completion.choices[0].finish_reason == "tool_calls"
    assert call.function.name == "schedule_meeting"
    assert json.loads(call.function.arguments)["attendees"] == ["Bob", "Alice"]


@pytest.mark.asyncio
async def test_gemini_stream_translates_text_and_usage(fixture_server, session) -> None:
    chunks, stream = await stream_through(fixture_server, session, "gemini", "gemini_stream.sse")
    assert text_of(chunks) == "The sky is blue because of Rayleigh scattering."
    assert (stream.usage.input_tokens, stream.usage.output_tokens) == (10, 9)


@pytest.mark.asyncio
async def test_gemini_blocked_prompt_and_errors(fixture_server, session) -> None:
    with pytest.raises(InvalidRequest) as blocked:
        await complete(fixture_server, session, "gemini", "gemini_prompt_blocked.json")
    assert blocked.value.code == "content_filter" and "SAFETY" in blocked.value.message
    with pytest.raises(UpstreamError) as bad_key:
        await complete(fixture_server, session, "gemini", "gemini_error_invalid_key.json", 400)
    assert bad_key.value.status == 502 and SECRET not in bad_key.value.message
    with pytest.raises(UpstreamRateLimited):
        await complete(fixture_server, session, "gemini", "gemini_error_quota.json", 429)
