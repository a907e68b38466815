"""The Gemini adapter, against the built-in mock's /v1beta endpoints and as pure translation."""

import base64
import struct
from typing import Any

import aiohttp
import httpx
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
)
from routing.mockprovider.content import completion_words, embedding_vector, plan_tool_call
from routing.providers.base import UpstreamStream
from routing.providers.gemini import GeminiAdapter
from routing.providers.gemini_format import (
    SKIP_THOUGHT_SIGNATURE,
    ChunkTranslator,
    chat_completion,
    finish_reason,
    generate_content_body,
    tool_call_id,
    usage_from_gemini,
)
from tests.support.processes import mock_provider

API_KEY = "gemini-test-secret-0123456789"
QUESTION = "Tell me about the mountains"
PROMPT = [{"role": "user", "content": QUESTION}]
# The mock counts words plus 3 tokens of framing per message.
PROMPT_TOKENS = 5 + 3
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a place",
        "parameters": {
            "type": "object",
            "properties": {"query": {"type": "string"}},
            "additionalProperties": False,
        },
    },
}
TIME_TOOL = {"type": "function", "function": {"name": "get_time"}}


@pytest.fixture
def adapter(session: aiohttp.ClientSession) -> GeminiAdapter:
    return GeminiAdapter(session)


def deployment_for(
    mock_root: str, model: str = "mock-small", *, ttft_timeout_s: float = 10.0
) -> DeploymentSpec:
    return DeploymentSpec(
        deployment_id=1,
        name="gemini-deployment",
        provider_id=1,
        provider_kind="gemini",
        base_url=f"{mock_root}/v1beta",
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
    body = {"model": "gemini", "messages": PROMPT, **payload}
    if stream:
        body["stream"] = True
        if usage:
            body["stream_options"] = {"include_usage": True}
    return ChatRequest(model="gemini", payload=body, stream=stream, include_usage=usage)


def last_request(mock_root: str) -> dict[str, Any]:
    """The newest request the mock received."""
    recorded = httpx.get(f"{mock_root}/_mock/requests", params={"limit": 1}).json()
    return recorded[-1]


async def collect(stream: UpstreamStream) -> list[bytes]:
    """Every SSE event of `stream`, split on blank lines, closing it afterwards."""
    events: list[bytes] = []
    try:
        async for batch in stream.events():
            events.extend(event for event in batch.split(b"\n\n") if event)
    finally:
        await stream.aclose()
    return events


def chunks_of(events: list[bytes]) -> list[ChatCompletionChunk]:
    assert events[-1] == b"data: [DONE]"
    return [ChatCompletionChunk.model_validate_json(event[6:]) for event in events[:-1]]


@pytest.mark.asyncio
async def test_chat_answers_with_a_valid_completion_and_the_mocks_usage(
    adapter: GeminiAdapter, mock_root: str
) -> None:
    reply = await adapter.chat(
        deployment_for(mock_root, "mock-small+tokens=7"), chat_for({}), request_id="req-1"
    )

    completion = ChatCompletion.model_validate_json(reply.body)
    assert completion.choices[0].message.content == " ".join(
        completion_words("mock-small", QUESTION, 7)
    )
    assert completion.choices[0].finish_reason == "stop"
    assert completion.model == "mock-small"
    assert reply.usage == TokenUsage(input_tokens=PROMPT_TOKENS, output_tokens=7)
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (
        PROMPT_TOKENS,
        7,
    )


@pytest.mark.asyncio
async def test_stream_chunks_validate_and_join_to_the_non_streamed_answer(
    adapter: GeminiAdapter, mock_root: str
) -> None:
    deployment = deployment_for(mock_root, "mock-small+tokens=9")
    whole = await adapter.chat(deployment, chat_for({}), request_id="req-1")
    stream = await adapter.chat_stream(
        deployment, chat_for({}, stream=True, usage=True), request_id="req-2"
    )
    chunks = chunks_of(await collect(stream))

    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[0].choices[0].delta.content == ""
    joined = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert joined == ChatCompletion.model_validate_json(whole.body).choices[0].message.content
    finish = chunks[-2]
    assert finish.choices[0].finish_reason == "stop" and finish.choices[0].delta.content is None
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 9
    assert len({chunk.id for chunk in chunks}) == 1
    assert stream.usage == whole.usage == TokenUsage(input_tokens=PROMPT_TOKENS, output_tokens=9)


@pytest.mark.asyncio
async def test_stream_sends_the_usage_chunk_only_when_the_client_asked(
    adapter: GeminiAdapter, mock_root: str
) -> None:
    stream = await adapter.chat_stream(
        deployment_for(mock_root, "mock-small+tokens=3"),
        chat_for({}, stream=True),
        request_id="req-1",
    )
    chunks = chunks_of(await collect(stream))

    assert all(chunk.usage is None and chunk.choices for chunk in chunks)
    assert chunks[-1].choices[0].finish_reason == "stop"
    # Metered all the same.
    assert stream.usage == TokenUsage(input_tokens=PROMPT_TOKENS, output_tokens=3)


@pytest.mark.asyncio
async def test_system_instruction_generation_config_and_key_reach_the_mock(
    adapter: GeminiAdapter, mock_root: str
) -> None:
    payload = {
        "messages": [
            {"role": "system", "content": "Be brief"},
            {"role": "developer", "content": "Answer in English"},
            *PROMPT,
        ],
        "temperature": 0.2,
        "top_p": 0.9,
        "max_completion_tokens": 4,
        "stop": "END",
        "n": 2,
        "seed": 7,
        "presence_penalty": 0.5,
        "frequency_penalty": -0.5,
        "response_format": {"type": "json_object"},
    }
    reply = await adapter.chat(deployment_for(mock_root), chat_for(payload), request_id="req-1")

    sent = last_request(mock_root)
    assert sent["path"] == "/v1beta/models/mock-small:generateContent"
    assert sent["headers"]["x-goog-api-key"] == API_KEY
    assert "authorization" not in sent["headers"]
    assert sent["json"]["systemInstruction"] == {
        "parts": [{"text": "Be brief"}, {"text": "Answer in English"}]
    }
    assert sent["json"]["contents"] == [{"role": "user", "parts": [{"text": QUESTION}]}]
    assert sent["json"]["generationConfig"] == {
        "temperature": 0.2,
        "topP": 0.9,
        "maxOutputTokens": 4,
        "stopSequences": ["END"],
        "candidateCount": 2,
        "seed": 7,
        "presencePenalty": 0.5,
        "frequencyPenalty": -0.5,
        "responseMimeType": "application/json",
    }
    completion = ChatCompletion.model_validate_json(reply.body)
    # maxOutputTokens capped the mock's 16 words, in both candidates.
    assert [choice.index for choice in completion.choices] == [0, 1]
    assert {choice.finish_reason for choice in completion.choices} == {"length"}
    assert completion.choices[1].message.content == " ".join(
        completion_words("mock-small", QUESTION, 4)
    )
    # System words count as prompt, without per-message framing.
    assert reply.usage == TokenUsage(input_tokens=PROMPT_TOKENS + 5, output_tokens=8)


@pytest.mark.asyncio
async def test_json_schema_goes_out_as_a_json_schema(
    adapter: GeminiAdapter, mock_root: str
) -> None:
    schema = {
        "type": "object",
        "properties": {"city": {"type": ["string", "null"]}},
        "required": ["city"],
        "additionalProperties": False,
    }
    response_format = {"type": "json_schema", "json_schema": {"name": "c", "schema": schema}}
    await adapter.chat(
        deployment_for(mock_root), chat_for({"response_format": response_format}), request_id="r"
    )

    config = last_request(mock_root)["json"]["generationConfig"]
    assert config == {"responseMimeType": "application/json", "responseJsonSchema": schema}


@pytest.mark.asyncio
async def test_function_call_agrees_streamed_and_not(
    adapter: GeminiAdapter, mock_root: str
) -> None:
    deployment = deployment_for(mock_root)
    payload = {"tools": [WEATHER_TOOL, TIME_TOOL]}
    whole = await adapter.chat(deployment, chat_for(payload), request_id="req-1")
    sent = last_request(mock_root)["json"]
    stream = await adapter.chat_stream(
        deployment, chat_for(payload, stream=True, usage=True), request_id="req-2"
    )
    chunks = chunks_of(await collect(stream))

    assert sent["tools"] == [
        {
            "functionDeclarations": [
                {
                    "name": "get_weather",
                    "description": "Weather for a place",
                    "parametersJsonSchema": WEATHER_TOOL["function"]["parameters"],
                },
                {"name": "get_time"},
            ]
        }
    ]
    choice = ChatCompletion.model_validate_json(whole.body).choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    [call] = choice.message.tool_calls or []
    assert call.type == "function"
    assert call.function.name == "get_weather"
    assert orjson.loads(call.function.arguments) == {"query": QUESTION}
    assert call.id == tool_call_id("get_weather", {"query": QUESTION})

    deltas = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or []]
    assert len(deltas) == 1
    assert deltas[0].index == 0 and deltas[0].id == call.id and deltas[0].type == "function"
    assert deltas[0].function is not None
    assert deltas[0].function.name == call.function.name
    assert deltas[0].function.arguments == call.function.arguments
    assert chunks[-2].choices[0].finish_reason == "tool_calls"
    expected = plan_tool_call(
        tool_names=["get_weather"], forced=None, answering_tool_result=False, prompt=QUESTION
    )
    assert expected is not None
    assert stream.usage == whole.usage
    assert whole.usage == TokenUsage(
        input_tokens=PROMPT_TOKENS, output_tokens=expected.completion_tokens
    )


@pytest.mark.asyncio
async def test_tool_choice_maps_to_function_calling_modes(
    adapter: GeminiAdapter, mock_root: str
) -> None:
    deployment = deployment_for(mock_root)
    tools = [WEATHER_TOOL, TIME_TOOL]
    forced = {"type": "function", "function": {"name": "get_time"}}

    reply = await adapter.chat(
        deployment, chat_for({"tools": tools, "tool_choice": forced}), request_id="r1"
    )
    forced_config = last_request(mock_root)["json"]["toolConfig"]
    none_reply = await adapter.chat(
        deployment, chat_for({"tools": tools, "tool_choice": "none"}), request_id="r2"
    )
    none_config = last_request(mock_root)["json"]["toolConfig"]
    await adapter.chat(
        deployment, chat_for({"tools": tools, "tool_choice": "required"}), request_id="r3"
    )
    required_config = last_request(mock_root)["json"]["toolConfig"]

    assert forced_config == {
        "functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": ["get_time"]}
    }
    [call] = ChatCompletion.model_validate_json(reply.body).choices[0].message.tool_calls or []
    assert call.function.name == "get_time"
    assert none_config == {"functionCallingConfig": {"mode": "NONE"}}
    none_choice = ChatCompletion.model_validate_json(none_reply.body).choices[0]
    assert none_choice.message.tool_calls is None and none_choice.finish_reason == "stop"
    assert required_config == {"functionCallingConfig": {"mode": "ANY"}}


@pytest.mark.asyncio
async def test_function_response_follow_up_answers_with_text(
    adapter: GeminiAdapter, mock_root: str
) -> None:
    deployment = deployment_for(mock_root, "mock-small+tokens=6")
    first = await adapter.chat(deployment, chat_for({"tools": [WEATHER_TOOL]}), request_id="r1")
    assistant = ChatCompletion.model_validate_json(first.body).choices[0].message
    call = (assistant.tool_calls or [])[0]
    follow_up = {
        "tools": [WEATHER_TOOL],
        "messages": [
            *PROMPT,
            assistant.model_dump(exclude_none=True),
            {"role": "tool", "tool_call_id": call.id, "content": '{"sky": "clear"}'},
        ],
    }
    reply = await adapter.chat(deployment, chat_for(follow_up), request_id="r2")
    stream = await adapter.chat_stream(
        deployment, chat_for(follow_up, stream=True), request_id="r3"
    )
    chunks = chunks_of(await collect(stream))

    sent = last_request(mock_root)["json"]
    assert sent["contents"][1:] == [
        {
            "role": "model",
            "parts": [
                {
                    "functionCall": {"name": "get_weather", "args": {"query": QUESTION}},
                    "thoughtSignature": SKIP_THOUGHT_SIGNATURE,
                }
            ],
        },
        {
            "role": "user",
            "parts": [
                {
                    "functionResponse": {
                        "name": "get_weather",
                        "response": {"content": {"sky": "clear"}},
                    }
                }
            ],
        },
    ]
    choice = ChatCompletion.model_validate_json(reply.body).choices[0]
    # The same words as the OpenAI family: the last user text is still the question.
    assert choice.message.content == " ".join(completion_words("mock-small", QUESTION, 6))
    assert choice.finish_reason == "stop" and choice.message.tool_calls is None
    joined = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert joined == choice.message.content


@pytest.mark.asyncio
async def test_image_data_urls_go_out_as_inline_data(
    adapter: GeminiAdapter, mock_root: str
) -> None:
    image = base64.b64encode(b"\x89PNG fake").decode()
    content = [
        {"type": "text", "text": QUESTION},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image}"}},
    ]
    reply = await adapter.chat(
        deployment_for(mock_root),
        chat_for({"messages": [{"role": "user", "content": content}]}),
        request_id="r1",
    )

    parts = last_request(mock_root)["json"]["contents"][0]["parts"]
    assert parts == [{"text": QUESTION}, {"inlineData": {"mimeType": "image/png", "data": image}}]
    assert ChatCompletion.model_validate_json(reply.body).choices[0].message.content


@pytest.mark.asyncio
async def test_blocked_prompt_is_a_400_content_filter(
    adapter: GeminiAdapter, mock_root: str
) -> None:
    deployment = deployment_for(mock_root, "mock-small+fault=blocked")

    with pytest.raises(InvalidRequest) as raised:
        await adapter.chat(deployment, chat_for({}), request_id="r1")
    stream = await adapter.chat_stream(deployment, chat_for({}, stream=True), request_id="r2")
    with pytest.raises(InvalidRequest) as raised_in_stream:
        await collect(stream)

    for error in (raised.value, raised_in_stream.value):
        assert error.status == 400
        assert error.code == "content_filter"
        assert "SAFETY" in error.message


@pytest.mark.asyncio
async def test_server_error_is_a_502_and_never_shows_the_key_or_url(
    adapter: GeminiAdapter, mock_root: str
) -> None:
    with pytest.raises(UpstreamError) as raised:
        await adapter.chat(
            deployment_for(mock_root, "mock-small+fault=500"), chat_for({}), request_id="r1"
        )
    with pytest.raises(UpstreamError) as raised_streaming:
        await adapter.chat_stream(
            deployment_for(mock_root, "mock-small+fault=503"),
            chat_for({}, stream=True),
            request_id="r2",
        )

    for error in (raised.value, raised_streaming.value):
        assert type(error) is UpstreamError and error.status == 502 and error.retryable
        assert API_KEY not in error.message and mock_root not in error.message


@pytest.mark.asyncio
async def test_a_refused_key_is_the_gateways_fault_not_the_clients(
    adapter: GeminiAdapter,
) -> None:
    with mock_provider(require_key="another-key") as url, pytest.raises(UpstreamError) as raised:
        await adapter.chat(deployment_for(url.removesuffix("/v1")), chat_for({}), request_id="r1")

    # Gemini says 400 for a bad key; retrying elsewhere may still succeed.
    assert type(raised.value) is UpstreamError and raised.value.retryable
    assert raised.value.message == "The upstream provider refused the gateway's credentials."


@pytest.mark.asyncio
async def test_rate_limit_keeps_retry_after(adapter: GeminiAdapter, mock_root: str) -> None:
    with pytest.raises(UpstreamRateLimited) as raised:
        await adapter.chat(
            deployment_for(mock_root, "mock-small+fault=429+retry_after=7"),
            chat_for({}),
            request_id="r1",
        )

    assert raised.value.status == 429
    assert raised.value.headers == {"retry-after": "7"}


@pytest.mark.asyncio
async def test_rejection_carries_geminis_error_message(
    adapter: GeminiAdapter, mock_root: str
) -> None:
    with pytest.raises(UpstreamRejected) as raised:
        await adapter.chat(
            deployment_for(mock_root, "mock-small+fault=400"), chat_for({}), request_id="r1"
        )

    assert (
        raised.value.message == "The provider rejected the request: mock fault: injected HTTP 400"
    )


@pytest.mark.asyncio
async def test_reset_mid_stream_raises_while_iterating(
    adapter: GeminiAdapter, mock_root: str
) -> None:
    stream = await adapter.chat_stream(
        deployment_for(mock_root, "mock-small+tokens=40+fault=reset"),
        chat_for({}, stream=True),
        request_id="r1",
    )
    received: list[bytes] = []

    with pytest.raises(UpstreamError):
        async for batch in stream.events():
            received.append(batch)
    await stream.aclose()

    assert received and received[0].startswith(b"data: ")
    assert stream.usage.estimated and stream.usage.output_tokens > 0


@pytest.mark.asyncio
async def test_malformed_event_mid_stream_is_upstream_malformed(
    adapter: GeminiAdapter, mock_root: str
) -> None:
    stream = await adapter.chat_stream(
        deployment_for(mock_root, "mock-small+fault=malformed"),
        chat_for({}, stream=True),
        request_id="r1",
    )

    with pytest.raises(UpstreamMalformed):
        await collect(stream)


@pytest.mark.asyncio
async def test_first_event_deadline_applies_to_a_slow_stream(
    adapter: GeminiAdapter, mock_root: str
) -> None:
    stream = await adapter.chat_stream(
        deployment_for(mock_root, "mock-small+ttft_ms=3000", ttft_timeout_s=0.3),
        chat_for({}, stream=True),
        request_id="r1",
    )

    with pytest.raises(UpstreamTimeout):
        await collect(stream)


@pytest.mark.asyncio
async def test_embeddings_as_floats_and_base64(adapter: GeminiAdapter, mock_root: str) -> None:
    deployment = deployment_for(mock_root, "mock-embed")
    inputs = ["first text", "second"]

    floats = await adapter.embeddings(
        deployment,
        EmbeddingsRequest(model="e", payload={"model": "e", "input": inputs, "dimensions": 4}),
        request_id="r1",
    )
    sent = last_request(mock_root)
    packed = await adapter.embeddings(
        deployment,
        EmbeddingsRequest(
            model="e", payload={"model": "e", "input": "first text", "encoding_format": "base64"}
        ),
        request_id="r2",
    )

    assert sent["path"] == "/v1beta/models/mock-embed:batchEmbedContents"
    assert sent["json"]["requests"][1] == {
        "model": "models/mock-embed",
        "content": {"parts": [{"text": "second"}]},
        "outputDimensionality": 4,
    }
    body = orjson.loads(floats.body)
    assert body["object"] == "list" and body["model"] == "mock-embed"
    assert [item["index"] for item in body["data"]] == [0, 1]
    assert body["data"][0]["embedding"] == embedding_vector("first text", 4)
    assert floats.usage.estimated and floats.usage.input_tokens > 0
    assert body["usage"]["prompt_tokens"] == floats.usage.input_tokens
    encoded = orjson.loads(packed.body)["data"][0]["embedding"]
    raw = base64.b64decode(encoded)
    assert list(struct.unpack(f"<{len(raw) // 4}f", raw)) == embedding_vector("first text", 8)


@pytest.mark.asyncio
async def test_token_array_embeddings_are_a_400(adapter: GeminiAdapter, mock_root: str) -> None:
    with pytest.raises(InvalidRequest) as raised:
        await adapter.embeddings(
            deployment_for(mock_root, "mock-embed"),
            EmbeddingsRequest(model="e", payload={"model": "e", "input": [1, 2, 3]}),
            request_id="r1",
        )

    assert raised.value.param == "input"


def test_chat_params_claim_only_what_is_translated() -> None:
    params = GeminiAdapter.chat_params
    assert params is not None
    assert {"messages", "stream_options", "tools", "tool_choice", "n", "response_format"} <= params
    assert not {"logprobs", "top_logprobs", "logit_bias", "parallel_tool_calls"} & params
    # End-user attribution is Tollgate's own: accepted, never sent to Gemini.
    assert "user" in params
    hello = {"role": "user", "content": "hi"}
    body = generate_content_body({"model": "m", "messages": [hello], "user": "end-user-7"})
    assert "end-user-7" not in str(body)
    assert GeminiAdapter.kind == "gemini"


def test_usage_counts_thoughts_as_output_and_cache_as_part_of_the_prompt() -> None:
    usage = usage_from_gemini(
        {
            "promptTokenCount": 120,
            "cachedContentTokenCount": 100,
            "candidatesTokenCount": 30,
            "thoughtsTokenCount": 50,
            "totalTokenCount": 200,
        }
    )

    assert usage == TokenUsage(
        input_tokens=120, cached_input_tokens=100, output_tokens=80, reasoning_tokens=50
    )
    assert usage_from_gemini(None) is None


@pytest.mark.parametrize(
    ("reason", "called_tools", "expected"),
    [
        ("STOP", False, "stop"),
        ("STOP", True, "tool_calls"),
        ("MAX_TOKENS", False, "length"),
        ("SAFETY", False, "content_filter"),
        ("RECITATION", False, "content_filter"),
        ("BLOCKLIST", False, "content_filter"),
        ("PROHIBITED_CONTENT", False, "content_filter"),
        ("SPII", False, "content_filter"),
        ("OTHER", False, "stop"),
        (None, False, "stop"),
    ],
)
def test_finish_reasons_map_to_openais(reason: object, called_tools: bool, expected: str) -> None:
    assert finish_reason(reason, called_tools=called_tools) == expected


def test_thought_parts_are_not_the_answer_and_usage_keeps_reasoning() -> None:
    response = {
        "candidates": [
            {
                "content": {
                    "role": "model",
                    "parts": [{"text": "thinking...", "thought": True}, {"text": "Answer."}],
                },
                "finishReason": "STOP",
            }
        ],
        "usageMetadata": {
            "promptTokenCount": 4,
            "candidatesTokenCount": 2,
            "thoughtsTokenCount": 9,
        },
        "responseId": "abc",
    }

    body, usage = chat_completion(response, model="gemini-2.5-flash", created=1)

    completion = ChatCompletion.model_validate(body)
    assert completion.id == "chatcmpl-abc"
    assert completion.choices[0].message.content == "Answer."
    assert completion.usage is not None
    assert completion.usage.completion_tokens_details is not None
    assert completion.usage.completion_tokens_details.reasoning_tokens == 9
    assert usage == TokenUsage(input_tokens=4, output_tokens=11, reasoning_tokens=9)


def test_stream_cut_before_finishing_is_malformed_with_an_estimate() -> None:
    translator = ChunkTranslator(model="gemini", choices=1)
    translator.translate_batch(
        [b'data: {"candidates":[{"content":{"parts":[{"text":"Hello there"}]}}]}']
    )

    with pytest.raises(UpstreamMalformed):
        translator.closing(include_usage=False)
    assert translator.usage == TokenUsage(output_tokens=3, estimated=True)


def test_error_event_mid_stream_raises_the_mapped_error() -> None:
    translator = ChunkTranslator(model="gemini", choices=1)

    with pytest.raises(UpstreamRateLimited):
        translator.translate_batch(
            [b'data: {"error":{"code":429,"message":"slow down","status":"RESOURCE_EXHAUSTED"}}']
        )


@pytest.mark.parametrize(
    ("message", "param"),
    [
        (
            {
                "role": "user",
                "content": [{"type": "image_url", "image_url": {"url": "https://x/y"}}],
            },
            "messages[0].content[0].image_url.url",
        ),
        (
            {"role": "tool", "tool_call_id": "call_unknown", "content": "x"},
            "messages[0].tool_call_id",
        ),
        (
            {
                "role": "assistant",
                "tool_calls": [
                    {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{"}}
                ],
            },
            "messages[0].tool_calls[0]",
        ),
    ],
)
def test_untranslatable_messages_are_a_400_naming_the_field(
    message: dict[str, Any], param: str
) -> None:
    with pytest.raises(InvalidRequest) as raised:
        generate_content_body({"messages": [message]})

    assert raised.value.param == param


def test_adjacent_turns_of_one_role_merge_and_tool_results_share_a_turn() -> None:
    calls = [
        {"id": f"c{i}", "type": "function", "function": {"name": f"f{i}", "arguments": "{}"}}
        for i in (1, 2)
    ]
    body = generate_content_body(
        {
            "messages": [
                {"role": "user", "content": "one"},
                {"role": "user", "content": "two"},
                {"role": "assistant", "content": "calling", "tool_calls": calls},
                {"role": "tool", "tool_call_id": "c1", "content": "plain text"},
                {"role": "tool", "tool_call_id": "c2", "content": [{"type": "text", "text": "7"}]},
            ]
        }
    )

    assert [content["role"] for content in body["contents"]] == ["user", "model", "user"]
    assert body["contents"][0]["parts"] == [{"text": "one"}, {"text": "two"}]
    assert body["contents"][1]["parts"][0] == {"text": "calling"}
    assert [part["functionResponse"] for part in body["contents"][2]["parts"]] == [
        {"name": "f1", "response": {"content": "plain text"}},
        {"name": "f2", "response": {"content": 7}},
    ]


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"tools": [{"type": "custom", "custom": {"name": "x"}}]}, "tools"),
        ({"tools": ["not a tool"]}, "tools"),
        ({"tools": [WEATHER_TOOL], "tool_choice": "sometimes"}, "tool_choice"),
        ({"response_format": {"type": "yaml"}}, "response_format"),
    ],
)
def test_untranslatable_options_are_a_400_naming_the_field(
    extra: dict[str, Any], param: str
) -> None:
    with pytest.raises(InvalidRequest) as raised:
        generate_content_body({"messages": PROMPT, **extra})

    assert raised.value.param == param
