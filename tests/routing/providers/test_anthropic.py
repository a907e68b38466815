"""The Anthropic adapter, against the built-in mock's /v1/messages and as pure translation."""

from typing import Any

import aiohttp
import orjson
import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from billing.contracts import TokenUsage
from routing.contracts import ChatRequest, DeploymentSpec, EmbeddingsRequest
from routing.errors import (
    InvalidRequest,
    UpstreamError,
    UpstreamMalformed,
    UpstreamRateLimited,
    UpstreamRejected,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from routing.mockprovider.content import plan_tool_call
from routing.providers.anthropic import AnthropicAdapter
from routing.providers.anthropic_format import (
    ChunkTranslator,
    chat_completion,
    finish_reason,
    messages_body,
    usage_from_anthropic,
)
from routing.providers.base import UpstreamStream
from tests.support.processes import free_port

API_KEY = "sk-ant-test-secret-0123456789"
QUESTION = "Tell me about the mountains"
PROMPT = [{"role": "user", "content": QUESTION}]
# The mock counts words plus 3 tokens of framing per message.
PROMPT_TOKENS = 5 + 3
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a place",
        "parameters": {"type": "object", "properties": {"query": {"type": "string"}}},
    },
}


@pytest.fixture
def adapter(session: aiohttp.ClientSession) -> AnthropicAdapter:
    return AnthropicAdapter(session)


def deployment_for(
    base_url: str, model: str = "mock-large", *, ttft_timeout_s: float = 10.0
) -> DeploymentSpec:
    return DeploymentSpec(
        deployment_id=1,
        name="claude-deployment",
        provider_id=1,
        provider_kind="anthropic",
        base_url=base_url,
        api_key=API_KEY,
        api_version="",
        upstream_model=model,
        weight=1,
        priority=0,
        connect_timeout_s=5.0,
        ttft_timeout_s=ttft_timeout_s,
        read_timeout_s=10.0,
        total_timeout_s=30.0,
    )


def chat_for(payload: dict[str, Any], *, stream: bool = False, usage: bool = False) -> ChatRequest:
    body = {"model": "claude", "messages": PROMPT, **payload}
    return ChatRequest(model="claude", payload=body, stream=stream, include_usage=usage)


async def stream_data(stream: UpstreamStream) -> list[bytes]:
    """The `data:` payloads of every event the stream yields (closing it afterwards)."""
    try:
        raw = b"".join([event async for event in stream.events()])
    finally:
        await stream.aclose()
    assert raw.endswith(b"\n\n")
    events = raw.split(b"\n\n")[:-1]
    assert all(event.startswith(b"data: ") for event in events)
    return [event.removeprefix(b"data: ") for event in events]


def chunks_of(data: list[bytes]) -> list[ChatCompletionChunk]:
    assert data[-1] == b"[DONE]"
    return [ChatCompletionChunk.model_validate_json(item) for item in data[:-1]]


async def recorded_body(session: aiohttp.ClientSession, root: str, model: str) -> dict[str, Any]:
    """The last body the mock received on /v1/messages for `model`, with its headers."""
    async with session.get(f"{root}/_mock/requests", params={"limit": "200"}) as response:
        records = await response.json()
    matching = [
        r for r in records if r["path"] == "/v1/messages" and r["json"].get("model") == model
    ]
    assert matching, f"the mock received no request for {model}"
    return {**matching[-1]["json"], "_headers": matching[-1]["headers"]}


# Talking to the mock


@pytest.mark.asyncio
async def test_text_answer_is_a_chat_completion_with_the_mocks_usage(
    adapter: AnthropicAdapter, mock_root: str
) -> None:
    reply = await adapter.chat(deployment_for(mock_root), chat_for({}), request_id="req-1")

    completion = ChatCompletion.model_validate_json(reply.body)
    choice = completion.choices[0]
    assert completion.id.startswith("msg_mock_")
    assert completion.model == "mock-large"
    assert choice.message.role == "assistant"
    assert choice.message.tool_calls is None
    assert len((choice.message.content or "").split(" ")) == 16
    assert choice.finish_reason == "stop"
    assert reply.usage == TokenUsage(input_tokens=PROMPT_TOKENS, output_tokens=16)
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (
        PROMPT_TOKENS,
        16,
    )
    assert completion.usage.total_tokens == PROMPT_TOKENS + 16
    assert completion.usage.prompt_tokens_details is not None
    assert completion.usage.prompt_tokens_details.cached_tokens == 0


@pytest.mark.asyncio
@pytest.mark.parametrize("include_usage", [True, False])
async def test_stream_chunks_validate_and_join_to_the_complete_answer(
    adapter: AnthropicAdapter, mock_root: str, include_usage: bool
) -> None:
    deployment = deployment_for(mock_root)
    whole = await adapter.chat(deployment, chat_for({}), request_id="req-2")
    stream = await adapter.chat_stream(
        deployment, chat_for({"stream": True}, stream=True, usage=include_usage), request_id="r"
    )
    chunks = chunks_of(await stream_data(stream))

    expected = ChatCompletion.model_validate_json(whole.body)
    usage_chunks = [c for c in chunks if not c.choices]
    content_chunks = [c for c in chunks if c.choices]
    assert content_chunks[0].choices[0].delta.role == "assistant"
    assert content_chunks[0].choices[0].delta.content == ""
    joined = "".join(c.choices[0].delta.content or "" for c in content_chunks)
    assert joined == expected.choices[0].message.content
    assert [c.choices[0].finish_reason for c in content_chunks][-1] == "stop"
    assert all(c.choices[0].finish_reason is None for c in content_chunks[:-1])
    assert {c.id for c in chunks} == {content_chunks[0].id}
    assert content_chunks[0].id.startswith("msg_mock_")
    if include_usage:
        assert len(usage_chunks) == 1 and chunks[-1] is usage_chunks[0]
        assert usage_chunks[0].usage == expected.usage
    else:
        assert usage_chunks == []
    assert stream.usage == whole.usage
    assert not stream.usage.estimated


@pytest.mark.asyncio
async def test_tool_call_is_the_same_streamed_or_not(
    adapter: AnthropicAdapter, mock_root: str
) -> None:
    deployment = deployment_for(mock_root)
    payload = {"tools": [WEATHER_TOOL]}
    reply = await adapter.chat(deployment, chat_for(payload), request_id="req-3")
    stream = await adapter.chat_stream(
        deployment, chat_for({**payload, "stream": True}, stream=True, usage=True), request_id="r"
    )
    chunks = chunks_of(await stream_data(stream))

    message = ChatCompletion.model_validate_json(reply.body).choices[0]
    planned = plan_tool_call(
        tool_names=["get_weather"], forced=None, answering_tool_result=False, prompt=QUESTION
    )
    assert planned is not None
    assert message.finish_reason == "tool_calls"
    assert message.message.content is None
    assert message.message.tool_calls is not None and len(message.message.tool_calls) == 1
    call = message.message.tool_calls[0]
    assert call.type == "function"
    assert call.id == "toolu_" + planned.call_id.removeprefix("call_")
    assert call.function.name == "get_weather"
    assert call.function.arguments == '{"query":"Tell me about the mountains"}'
    assert reply.usage == TokenUsage(
        input_tokens=PROMPT_TOKENS, output_tokens=planned.completion_tokens
    )

    deltas = [
        tool_call
        for chunk in chunks
        for choice in chunk.choices
        for tool_call in choice.delta.tool_calls or []
    ]
    opening, fragments = deltas[0], deltas[1:]
    assert (opening.index, opening.id, opening.type) == (0, call.id, "function")
    assert opening.function is not None and opening.function.name == "get_weather"
    assert opening.function.arguments == ""
    assert len(fragments) >= 2
    assert all(f.index == 0 and f.id is None for f in fragments)
    joined = "".join(f.function.arguments or "" for f in fragments if f.function)
    assert joined == call.function.arguments
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
    assert all(not c.choices[0].delta.content for c in chunks if c.choices)
    assert stream.usage == reply.usage


@pytest.mark.asyncio
async def test_forced_tool_and_parallel_flag_reach_anthropic(
    adapter: AnthropicAdapter, mock_root: str, session: aiohttp.ClientSession
) -> None:
    lookup = {"type": "function", "function": {"name": "lookup"}}
    payload = {
        "tools": [WEATHER_TOOL, lookup],
        "tool_choice": {"type": "function", "function": {"name": "lookup"}},
        "parallel_tool_calls": False,
    }
    reply = await adapter.chat(
        deployment_for(mock_root, "forced-tool"), chat_for(payload), request_id="req-4"
    )

    call = ChatCompletion.model_validate_json(reply.body).choices[0].message.tool_calls
    assert call is not None and call[0].function.name == "lookup"
    sent = await recorded_body(session, mock_root, "forced-tool")
    assert sent["tool_choice"] == {
        "type": "tool",
        "name": "lookup",
        "disable_parallel_tool_use": True,
    }
    assert sent["tools"] == [
        {
            "name": "get_weather",
            "description": "Weather for a place",
            "input_schema": WEATHER_TOOL["function"]["parameters"],  # type: ignore[index]
        },
        {"name": "lookup", "input_schema": {"type": "object", "properties": {}}},
    ]


@pytest.mark.asyncio
async def test_tool_result_follow_up_is_answered_with_text(
    adapter: AnthropicAdapter, mock_root: str, session: aiohttp.ClientSession
) -> None:
    deployment = deployment_for(mock_root, "tool-follow-up")
    first = await adapter.chat(deployment, chat_for({"tools": [WEATHER_TOOL]}), request_id="a")
    assistant = orjson.loads(first.body)["choices"][0]["message"]
    call_id = assistant["tool_calls"][0]["id"]
    follow_up = {
        "tools": [WEATHER_TOOL],
        "messages": [
            *PROMPT,
            assistant,
            {"role": "tool", "tool_call_id": call_id, "content": "Sunny, 21 degrees"},
        ],
    }

    reply = await adapter.chat(deployment, chat_for(follow_up), request_id="b")
    stream = await adapter.chat_stream(
        deployment, chat_for({**follow_up, "stream": True}, stream=True), request_id="c"
    )
    chunks = chunks_of(await stream_data(stream))

    choice = ChatCompletion.model_validate_json(reply.body).choices[0]
    assert choice.finish_reason == "stop"
    assert choice.message.tool_calls is None
    assert choice.message.content
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == choice.message.content
    sent = await recorded_body(session, mock_root, "tool-follow-up")
    assert sent["messages"][1:] == [
        {
            "role": "assistant",
            "content": [
                {
                    "type": "tool_use",
                    "id": call_id,
                    "name": "get_weather",
                    "input": {"query": QUESTION},
                }
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": call_id, "content": "Sunny, 21 degrees"}
            ],
        },
    ]


@pytest.mark.asyncio
async def test_system_prompt_stop_user_and_headers_reach_the_mock(
    adapter: AnthropicAdapter, mock_root: str, session: aiohttp.ClientSession
) -> None:
    payload = {
        "messages": [
            {"role": "system", "content": "You are terse"},
            {"role": "developer", "content": [{"type": "text", "text": "Answer in English"}]},
            *PROMPT,
        ],
        "stop": "END",
        "temperature": 0.2,
        "top_p": 0.9,
        "user": "user-42",
        "metadata": {"purpose": "test"},
    }
    reply = await adapter.chat(
        deployment_for(mock_root, "recorded-system"), chat_for(payload), request_id="req-7"
    )

    sent = await recorded_body(session, mock_root, "recorded-system")
    headers = sent.pop("_headers")
    assert sent == {
        "model": "recorded-system",
        "system": "You are terse\n\nAnswer in English",
        "messages": PROMPT,
        "max_tokens": 4096,
        "stop_sequences": ["END"],
        "temperature": 0.2,
        "top_p": 0.9,
        "metadata": {"user_id": "user-42"},
    }
    assert headers["x-api-key"] == API_KEY
    assert headers["anthropic-version"] == "2023-06-01"
    assert headers["x-request-id"] == "req-7"
    assert "authorization" not in headers
    # The mock counts the system prompt's words too.
    assert reply.usage.input_tokens == PROMPT_TOKENS + 3 + 3


@pytest.mark.asyncio
@pytest.mark.parametrize("cap_field", ["max_tokens", "max_completion_tokens"])
async def test_token_cap_is_sent_as_max_tokens_and_reports_length(
    adapter: AnthropicAdapter, mock_root: str, session: aiohttp.ClientSession, cap_field: str
) -> None:
    model = f"capped-{cap_field}"
    reply = await adapter.chat(
        deployment_for(mock_root, model), chat_for({cap_field: 4}), request_id="req-8"
    )

    choice = ChatCompletion.model_validate_json(reply.body).choices[0]
    assert choice.finish_reason == "length"
    assert len((choice.message.content or "").split(" ")) == 4
    assert reply.usage.output_tokens == 4
    sent = await recorded_body(session, mock_root, model)
    assert sent["max_tokens"] == 4
    assert "max_completion_tokens" not in sent


@pytest.mark.asyncio
async def test_a_v1_suffix_on_the_base_url_is_tolerated(
    adapter: AnthropicAdapter, mock_root: str
) -> None:
    reply = await adapter.chat(deployment_for(mock_root + "/v1/"), chat_for({}), request_id="r")

    assert ChatCompletion.model_validate_json(reply.body).choices[0].message.content


# Faults


@pytest.mark.asyncio
@pytest.mark.parametrize("stream", [False, True])
async def test_overloaded_529_is_a_retryable_502(
    adapter: AnthropicAdapter, mock_root: str, stream: bool
) -> None:
    deployment = deployment_for(mock_root, "mock-large+fault=529")
    with pytest.raises(UpstreamError) as caught:
        if stream:
            await adapter.chat_stream(deployment, chat_for({}, stream=True), request_id="r")
        else:
            await adapter.chat(deployment, chat_for({}), request_id="r")

    assert type(caught.value) is UpstreamError
    assert caught.value.status == 502
    assert caught.value.retryable


@pytest.mark.asyncio
async def test_rate_limit_carries_retry_after(adapter: AnthropicAdapter, mock_root: str) -> None:
    deployment = deployment_for(mock_root, "mock-large+fault=429+retry_after=3")
    with pytest.raises(UpstreamRateLimited) as caught:
        await adapter.chat(deployment, chat_for({}), request_id="r")

    assert caught.value.status == 429
    assert caught.value.headers == {"retry-after": "3"}


@pytest.mark.asyncio
async def test_bad_request_is_rejected_without_retry(
    adapter: AnthropicAdapter, mock_root: str
) -> None:
    deployment = deployment_for(mock_root, "mock-large+fault=400")
    with pytest.raises(UpstreamRejected) as caught:
        await adapter.chat(deployment, chat_for({}), request_id="r")

    assert caught.value.status == 400
    assert not caught.value.retryable
    assert "mock fault: injected HTTP 400" in caught.value.message


@pytest.mark.asyncio
@pytest.mark.parametrize("fault", ["400", "401", "500", "unreachable"])
async def test_errors_never_reveal_the_key_or_base_url(
    adapter: AnthropicAdapter, mock_root: str, fault: str
) -> None:
    if fault == "unreachable":
        deployment = deployment_for(f"http://127.0.0.1:{free_port()}")
        expected: type[UpstreamError] = UpstreamUnreachable
    else:
        deployment = deployment_for(mock_root, f"mock-large+fault={fault}")
        expected = UpstreamRejected if fault == "400" else UpstreamError
    with pytest.raises(expected) as caught:
        await adapter.chat(deployment, chat_for({}), request_id="r")

    text = caught.value.message + str(caught.value) + caught.value.openai_body().decode()
    assert API_KEY not in text
    assert "127.0.0.1" not in text


@pytest.mark.asyncio
async def test_reset_mid_stream_raises_and_usage_counts_what_arrived(
    adapter: AnthropicAdapter, mock_root: str
) -> None:
    deployment = deployment_for(mock_root, "mock-large+fault=reset+tokens=8")
    whole = await adapter.chat(
        deployment_for(mock_root, "mock-large+tokens=8"), chat_for({}), request_id="r"
    )
    stream = await adapter.chat_stream(deployment, chat_for({}, stream=True), request_id="r")
    received: list[bytes] = []
    with pytest.raises(UpstreamError):
        try:
            async for event in stream.events():
                received.append(event)
        finally:
            await stream.aclose()
    await stream.aclose()  # safe twice

    data = [e.removeprefix(b"data: ") for e in b"".join(received).split(b"\n\n") if e]
    chunks = [ChatCompletionChunk.model_validate_json(item) for item in data]
    words = (
        ChatCompletion.model_validate_json(whole.body).choices[0].message.content or ""
    ).split()
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == " ".join(words[:4])
    assert stream.usage == TokenUsage(input_tokens=PROMPT_TOKENS, output_tokens=4, estimated=True)


@pytest.mark.asyncio
async def test_malformed_stream_event_raises_upstream_malformed(
    adapter: AnthropicAdapter, mock_root: str
) -> None:
    deployment = deployment_for(mock_root, "mock-large+fault=malformed")
    stream = await adapter.chat_stream(deployment, chat_for({}, stream=True), request_id="r")

    with pytest.raises(UpstreamMalformed):
        await stream_data(stream)


@pytest.mark.asyncio
async def test_first_event_deadline_is_enforced(adapter: AnthropicAdapter, mock_root: str) -> None:
    deployment = deployment_for(mock_root, "mock-large+ttft_ms=3000", ttft_timeout_s=0.3)

    with pytest.raises(UpstreamTimeout):
        stream = await adapter.chat_stream(deployment, chat_for({}, stream=True), request_id="r")
        await stream_data(stream)


@pytest.mark.asyncio
async def test_embeddings_are_rejected(adapter: AnthropicAdapter, mock_root: str) -> None:
    request = EmbeddingsRequest(model="claude", payload={"model": "claude", "input": "hi"})
    with pytest.raises(UpstreamRejected) as caught:
        await adapter.embeddings(deployment_for(mock_root), request, request_id="r")

    assert caught.value.status == 400
    assert "does not offer embeddings" in caught.value.message


# Pure translation


def test_chat_params_name_what_anthropic_can_honour() -> None:
    params = AnthropicAdapter.chat_params

    assert params is not None
    assert {
        "model", "messages", "stream", "stream_options", "max_tokens", "max_completion_tokens",
        "temperature", "top_p", "stop", "tools", "tool_choice", "user", "n",
        "parallel_tool_calls", "metadata",
    } <= params  # fmt: skip
    assert not params & {
        "seed", "logprobs", "top_logprobs", "presence_penalty", "frequency_penalty",
        "logit_bias", "response_format",
    }  # fmt: skip


def test_images_become_base64_or_url_sources() -> None:
    content = [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}},
    ]
    body = messages_body(
        {"messages": [{"role": "user", "content": content}]}, model="m", stream=False
    )

    assert body["messages"][0]["content"] == [
        {"type": "text", "text": "What is this?"},
        {
            "type": "image",
            "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="},
        },
        {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}},
    ]


@pytest.mark.parametrize(
    "url", ["data:image/png,rawbytes", "ftp://example.com/cat.jpg", "file:///etc/passwd"]
)
def test_unusable_image_urls_are_invalid_requests(url: str) -> None:
    message = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}

    with pytest.raises(InvalidRequest) as caught:
        messages_body({"messages": [message]}, model="m", stream=False)

    assert caught.value.param == "messages[0].content[0]"


def test_consecutive_tool_messages_become_one_user_turn() -> None:
    calls = [
        {"id": f"call_{n}", "type": "function", "function": {"name": "f", "arguments": "{}"}}
        for n in (1, 2)
    ]
    body = messages_body(
        {
            "messages": [
                {"role": "user", "content": "go"},
                {"role": "assistant", "content": "Calling both.", "tool_calls": calls},
                {"role": "tool", "tool_call_id": "call_1", "content": "one"},
                {
                    "role": "tool",
                    "tool_call_id": "call_2",
                    "content": [{"type": "text", "text": "2"}],
                },
                {"role": "user", "content": "thanks"},
            ]
        },
        model="m",
        stream=True,
    )

    assert body["stream"] is True
    assert body["messages"][1:] == [
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Calling both."},
                {"type": "tool_use", "id": "call_1", "name": "f", "input": {}},
                {"type": "tool_use", "id": "call_2", "name": "f", "input": {}},
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "call_1", "content": "one"},
                {"type": "tool_result", "tool_use_id": "call_2", "content": "2"},
            ],
        },
        {"role": "user", "content": "thanks"},
    ]


@pytest.mark.parametrize("arguments", ["{not json", "[1, 2]"])
def test_bad_tool_arguments_are_an_invalid_request_naming_the_message(arguments: str) -> None:
    call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": arguments}}
    messages = [*PROMPT, {"role": "assistant", "content": None, "tool_calls": [call]}]

    with pytest.raises(InvalidRequest) as caught:
        messages_body({"messages": messages}, model="m", stream=False)

    assert caught.value.param == "messages[1].tool_calls[0]"
    assert "messages[1].tool_calls[0].function.arguments" in caught.value.message


def test_more_than_one_choice_is_an_invalid_request() -> None:
    with pytest.raises(InvalidRequest) as caught:
        messages_body({"messages": PROMPT, "n": 2}, model="m", stream=False)

    assert caught.value.param == "n"
    assert messages_body({"messages": PROMPT, "n": 1}, model="m", stream=False)


@pytest.mark.parametrize(
    ("choice", "parallel", "expected"),
    [
        ("auto", None, {"type": "auto"}),
        ("required", None, {"type": "any"}),
        ("none", False, {"type": "none"}),
        ({"type": "function", "function": {"name": "f"}}, None, {"type": "tool", "name": "f"}),
        (None, False, {"type": "auto", "disable_parallel_tool_use": True}),
        ("required", False, {"type": "any", "disable_parallel_tool_use": True}),
        (None, None, None),
    ],
)
def test_tool_choice_translation(choice: object, parallel: object, expected: object) -> None:
    payload: dict[str, Any] = {"messages": PROMPT, "tools": [WEATHER_TOOL]}
    if choice is not None:
        payload["tool_choice"] = choice
    if parallel is not None:
        payload["parallel_tool_calls"] = parallel

    assert messages_body(payload, model="m", stream=False).get("tool_choice") == expected


def test_stop_list_is_sent_as_stop_sequences() -> None:
    body = messages_body({"messages": PROMPT, "stop": ["a", "b"]}, model="m", stream=False)

    assert body["stop_sequences"] == ["a", "b"]


@pytest.mark.parametrize(
    ("stop_reason", "expected"),
    [
        ("end_turn", "stop"),
        ("stop_sequence", "stop"),
        ("max_tokens", "length"),
        ("tool_use", "tool_calls"),
        ("refusal", "content_filter"),
        ("something_new", "stop"),
    ],
)
def test_stop_reasons_map_to_finish_reasons(stop_reason: str, expected: str) -> None:
    assert finish_reason(stop_reason) == expected


def test_cached_prompt_tokens_count_as_input_and_as_cached() -> None:
    message = {
        "id": "msg_1",
        "model": "claude-x",
        "content": [
            {"type": "thinking", "thinking": "hmm", "signature": "s"},
            {"type": "text", "text": "Hello "},
            {"type": "text", "text": "there"},
        ],
        "stop_reason": "end_turn",
        "usage": {
            "input_tokens": 10,
            "cache_creation_input_tokens": 5,
            "cache_read_input_tokens": 100,
            "output_tokens": 7,
        },
    }

    body, usage = chat_completion(message, created=1_700_000_000)

    completion = ChatCompletion.model_validate_json(body)
    assert completion.choices[0].message.content == "Hello there"
    assert usage == TokenUsage(input_tokens=115, cached_input_tokens=100, output_tokens=7)
    assert completion.usage is not None and completion.usage.prompt_tokens == 115
    assert completion.usage.prompt_tokens_details is not None
    assert completion.usage.prompt_tokens_details.cached_tokens == 100
    assert usage_from_anthropic({"output_tokens": 3}) is None


def test_translator_indexes_tool_calls_and_skips_thinking() -> None:
    translator = ChunkTranslator(include_usage=True)
    events: list[dict[str, Any]] = [
        {
            "type": "message_start",
            "message": {"id": "msg_1", "model": "claude-x", "usage": {"input_tokens": 9}},
        },
        {"type": "content_block_start", "index": 0, "content_block": {"type": "thinking"}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "thinking_delta"}},
        {"type": "content_block_start", "index": 1, "content_block": {"type": "text", "text": ""}},
        {"type": "content_block_delta", "index": 1, "delta": {"type": "text_delta", "text": "Hi"}},
        {
            "type": "content_block_start",
            "index": 2,
            "content_block": {"type": "tool_use", "id": "toolu_a", "name": "f", "input": {}},
        },
        {
            "type": "content_block_delta",
            "index": 2,
            "delta": {"type": "input_json_delta", "partial_json": "{}"},
        },
        {
            "type": "content_block_start",
            "index": 3,
            "content_block": {"type": "tool_use", "id": "toolu_b", "name": "g", "input": {}},
        },
        {"type": "ping"},
        {
            "type": "message_delta",
            "delta": {"stop_reason": "tool_use"},
            "usage": {"output_tokens": 5},
        },
        {"type": "message_stop"},
    ]

    out = b"".join(b"".join(translator.translate(event)) for event in events)

    data = [e.removeprefix(b"data: ") for e in out.split(b"\n\n") if e]
    chunks = chunks_of(data)
    calls = [call for c in chunks if c.choices for call in c.choices[0].delta.tool_calls or []]
    assert [(call.index, call.id) for call in calls] == [(0, "toolu_a"), (0, None), (1, "toolu_b")]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hi"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 5
    assert translator.finished
    assert translator.usage == TokenUsage(input_tokens=9, output_tokens=5)


@pytest.mark.parametrize(
    ("error_type", "expected"),
    [
        ("overloaded_error", UpstreamError),
        ("api_error", UpstreamError),
        ("rate_limit_error", UpstreamRateLimited),
    ],
)
def test_error_event_mid_stream_raises_with_its_message(
    error_type: str, expected: type[UpstreamError]
) -> None:
    translator = ChunkTranslator(include_usage=False)
    translator.translate_batch(
        [b'event: message_start\ndata: {"type":"message_start","message":{"id":"m"}}']
    )
    error = {"type": "error", "error": {"type": error_type, "message": "Overloaded"}}

    with pytest.raises(UpstreamError) as caught:
        translator.translate_batch([b"event: error\ndata: " + orjson.dumps(error)])

    assert type(caught.value) is expected
    assert "Overloaded" in caught.value.message
    assert caught.value.retryable
