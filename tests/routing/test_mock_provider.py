"""The built-in mock provider, driven through the official OpenAI and Anthropic SDKs."""

from __future__ import annotations

import base64
import json
import math
import struct
import time
from collections.abc import Iterator

import anthropic
import httpx
import openai
import pytest

from routing.mockprovider.content import ToolCall, plan_tool_call
from tests.support.processes import mock_provider

PROMPT = [{"role": "user", "content": "Tell me about the mountains"}]
# Words in PROMPT plus 3 tokens of framing per message.
PROMPT_TOKENS = 5 + 3


@pytest.fixture(scope="module")
def mock_url() -> Iterator[str]:
    with mock_provider() as url:
        yield url


@pytest.fixture
def root_url(mock_url: str) -> str:
    return mock_url.removesuffix("/v1")


@pytest.fixture
def client(mock_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=mock_url, api_key="x", max_retries=0)


@pytest.fixture
def claude(root_url: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=root_url, api_key="x", max_retries=0)


def test_chat_completion_is_deterministic_with_word_token_usage(
    client: openai.OpenAI,
) -> None:
    first = client.chat.completions.create(model="mock-small+tokens=7", messages=PROMPT)
    again = client.chat.completions.create(model="mock-small+tokens=7", messages=PROMPT)
    other = client.chat.completions.create(
        model="mock-small+tokens=7",
        messages=[{"role": "user", "content": "Something else"}],
    )

    content = first.choices[0].message.content
    assert content is not None and len(content.split(" ")) == 7
    assert again.choices[0].message.content == content
    assert other.choices[0].message.content != content
    assert first.model == "mock-small"
    assert first.object == "chat.completion"
    assert first.choices[0].message.role == "assistant"
    assert first.choices[0].finish_reason == "stop"
    assert first.usage is not None
    assert (first.usage.prompt_tokens, first.usage.completion_tokens) == (
        PROMPT_TOKENS,
        7,
    )
    assert first.usage.total_tokens == PROMPT_TOKENS + 7


def test_prompt_tokens_count_every_message_and_text_part(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model="mock-small",
        messages=[
            {"role": "system", "content": "Be brief"},
            {"role": "user", "content": [{"type": "text", "text": "one two three"}]},
        ],
    )

    assert completion.usage is not None
    assert completion.usage.prompt_tokens == (2 + 3) + (3 + 3)


def test_stream_with_usage_joins_to_the_non_streamed_answer(
    client: openai.OpenAI,
) -> None:
    whole = client.chat.completions.create(model="mock-small", messages=PROMPT)
    chunks = list(
        client.chat.completions.create(
            model="mock-small",
            messages=PROMPT,
            stream=True,
            stream_options={"include_usage": True},
        )
    )

    content_chunks, usage_chunk = chunks[:-1], chunks[-1]
    streamed = "".join(c.choices[0].delta.content or "" for c in content_chunks)
    assert streamed == whole.choices[0].message.content
    assert content_chunks[0].choices[0].delta.role == "assistant"
    assert content_chunks[-1].choices[0].finish_reason == "stop"
    assert all(c.usage is None for c in content_chunks)
    assert usage_chunk.choices == []
    assert usage_chunk.usage == whole.usage
    assert {c.id for c in chunks} == {chunks[0].id}


def test_stream_without_include_usage_has_no_usage_chunk(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(model="mock-small+tokens=3", messages=PROMPT, stream=True)
    )

    assert all(c.choices for c in chunks)
    assert all(c.usage is None for c in chunks)
    # role chunk, three words, finish chunk
    assert len(chunks) == 5


@pytest.mark.parametrize("cap_field", ["max_tokens", "max_completion_tokens"])
def test_token_cap_truncates_and_reports_length(client: openai.OpenAI, cap_field: str) -> None:
    full = client.chat.completions.create(model="mock-small", messages=PROMPT)
    capped = client.chat.completions.create(model="mock-small", messages=PROMPT, **{cap_field: 4})

    full_words = (full.choices[0].message.content or "").split(" ")
    assert capped.choices[0].message.content == " ".join(full_words[:4])
    assert capped.choices[0].finish_reason == "length"
    assert capped.usage is not None and capped.usage.completion_tokens == 4


def test_embeddings_default_base64_decodes_to_the_float_vectors(
    client: openai.OpenAI, mock_url: str
) -> None:
    decoded = client.embeddings.create(model="mock-embed", input=["alpha beta", "gamma"])
    as_floats = client.embeddings.create(
        model="mock-embed", input=["alpha beta", "gamma"], encoding_format="float"
    )

    raw_request = httpx.post(
        f"{mock_url}/embeddings", json={"model": "mock-embed", "input": "alpha beta"}
    ).json()
    assert isinstance(raw_request["data"][0]["embedding"], list)  # float unless asked otherwise
    assert [d.embedding for d in decoded.data] == [d.embedding for d in as_floats.data]
    assert decoded.data[0].embedding != decoded.data[1].embedding
    for item in decoded.data:
        assert len(item.embedding) == 8
        assert math.isclose(math.sqrt(sum(v * v for v in item.embedding)), 1.0, rel_tol=1e-5)
    assert decoded.usage.prompt_tokens == 3
    assert decoded.model == "mock-embed"


def test_embeddings_honour_dimensions_and_base64_is_little_endian_float32(
    client: openai.OpenAI,
) -> None:
    raw = client.embeddings.create(
        model="mock-embed", input=[[1, 2, 3]], dimensions=32, encoding_format="base64"
    )
    floats = client.embeddings.create(
        model="mock-embed", input=[[1, 2, 3]], dimensions=32, encoding_format="float"
    )

    encoded = raw.data[0].embedding
    assert isinstance(encoded, str)
    assert list(struct.unpack("<32f", base64.b64decode(encoded))) == floats.data[0].embedding
    assert raw.usage.prompt_tokens == 3


def test_models_list_names_the_mock_models(client: openai.OpenAI) -> None:
    models = list(client.models.list())

    assert {"mock-small", "mock-large", "mock-embed"} <= {m.id for m in models}
    assert all(m.owned_by == "mock" for m in models)


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (400, openai.BadRequestError),
        (401, openai.AuthenticationError),
        (403, openai.PermissionDeniedError),
        (404, openai.NotFoundError),
        (500, openai.InternalServerError),
        (502, openai.InternalServerError),
        (503, openai.InternalServerError),
        (529, openai.InternalServerError),
    ],
)
def test_status_faults_raise_the_matching_sdk_error(
    client: openai.OpenAI, status: int, error: type[openai.APIStatusError]
) -> None:
    with pytest.raises(error) as caught:
        client.chat.completions.create(model=f"mock-small+fault={status}", messages=PROMPT)

    assert caught.value.status_code == status
    assert "mock fault" in caught.value.message


def test_rate_limit_fault_sends_retry_after(client: openai.OpenAI) -> None:
    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(model="mock-small+fault=429+retry_after=7", messages=PROMPT)
    with pytest.raises(openai.RateLimitError) as without:
        client.chat.completions.create(
            model="mock-small+fault=429+retry-after=none", messages=PROMPT
        )

    assert caught.value.response.headers["retry-after"] == "7"
    assert "retry-after" not in without.value.response.headers


def test_stream_request_with_status_fault_gets_a_plain_error(
    client: openai.OpenAI,
) -> None:
    with pytest.raises(openai.InternalServerError):
        client.chat.completions.create(model="mock-small+fault=503", messages=PROMPT, stream=True)


def test_embeddings_faults_use_the_openai_shape(client: openai.OpenAI) -> None:
    with pytest.raises(openai.RateLimitError) as caught:
        client.embeddings.create(model="mock-embed+fault=429", input="hello")

    assert caught.value.code == "rate_limit_exceeded"


def test_hang_times_out_without_blocking_other_requests(client: openai.OpenAI) -> None:
    started = time.monotonic()
    with pytest.raises(openai.APITimeoutError):
        client.chat.completions.create(model="mock-small+fault=hang", messages=PROMPT, timeout=0.5)
    assert time.monotonic() - started < 5

    answer = client.chat.completions.create(model="mock-small", messages=PROMPT, timeout=5)
    assert answer.choices[0].message.content


def test_reset_drops_the_connection_without_a_response(client: openai.OpenAI) -> None:
    with pytest.raises(openai.APIConnectionError) as caught:
        client.chat.completions.create(model="mock-small+fault=reset", messages=PROMPT)

    assert not isinstance(caught.value, openai.APITimeoutError)


def test_mid_stream_reset_delivers_half_the_words_then_raises(
    client: openai.OpenAI,
) -> None:
    received: list[str] = []
    with pytest.raises(openai.APIConnectionError):
        for chunk in client.chat.completions.create(
            model="mock-small+fault=reset+tokens=10", messages=PROMPT, stream=True
        ):
            received.append(chunk.choices[0].delta.content or "")

    expected = client.chat.completions.create(model="mock-small+tokens=10", messages=PROMPT)
    words = (expected.choices[0].message.content or "").split(" ")
    assert "".join(received) == " ".join(words[:5])


def test_malformed_body_is_not_json(client: openai.OpenAI) -> None:
    # The SDK lets the JSON decoder's error escape instead of wrapping it in APIError.
    with pytest.raises(json.JSONDecodeError):
        client.chat.completions.create(model="mock-small+fault=malformed", messages=PROMPT)


def test_malformed_stream_breaks_after_one_good_chunk(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="mock-small+fault=malformed", messages=PROMPT, stream=True
    )
    chunks = iter(stream)

    first = next(chunks)
    with pytest.raises(json.JSONDecodeError):
        next(chunks)
    assert first.choices[0].delta.role == "assistant"


def test_header_option_beats_model_directive(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model="mock-small+tokens=5+fault=500",
        messages=PROMPT,
        extra_headers={"x-mock-tokens": "2", "X-Mock-Fault": "none"},
    )

    assert len((completion.choices[0].message.content or "").split(" ")) == 2


def test_invalid_option_is_a_bad_request_not_a_crash(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as from_header:
        client.chat.completions.create(
            model="mock-small",
            messages=PROMPT,
            extra_headers={"x-mock-ttft-ms": "soon"},
        )
    with pytest.raises(openai.BadRequestError) as from_model:
        client.chat.completions.create(model="mock-small+colour=blue", messages=PROMPT)

    assert "ttft_ms" in from_header.value.message
    assert "colour" in from_model.value.message


def test_stream_sends_headers_at_once_and_waits_ttft_for_content(client: openai.OpenAI) -> None:
    started = time.monotonic()
    stream = client.chat.completions.create(
        model="mock-small+ttft_ms=1000+chunk_delay_ms=50+tokens=4", messages=PROMPT, stream=True
    )
    headers_after_s = time.monotonic() - started
    first = next(iter(stream))
    first_chunk_after_s = time.monotonic() - started
    rest = list(stream)
    done_after_s = time.monotonic() - started

    assert first.choices[0].delta.role == "assistant"
    assert headers_after_s < 0.8
    assert first_chunk_after_s >= 1.0
    # Three more words and the finish chunk, each 50 ms apart.
    assert done_after_s >= 1.0 + 4 * 0.05
    assert len(rest) == 5


def test_n_choices_repeat_the_answer_and_multiply_completion_tokens(
    client: openai.OpenAI,
) -> None:
    single = client.chat.completions.create(model="mock-small+tokens=3", messages=PROMPT)
    double = client.chat.completions.create(model="mock-small+tokens=3", messages=PROMPT, n=2)

    assert [c.index for c in double.choices] == [0, 1]
    assert {c.message.content for c in double.choices} == {single.choices[0].message.content}
    assert double.usage is not None and double.usage.completion_tokens == 6


def test_latency_delays_the_non_streamed_answer(client: openai.OpenAI) -> None:
    started = time.monotonic()
    client.chat.completions.create(
        model="mock-small", messages=PROMPT, extra_headers={"x-mock-latency-ms": "300"}
    )

    assert time.monotonic() - started >= 0.3


def test_invalid_json_and_missing_fields_are_openai_400s(mock_url: str) -> None:
    bad_json = httpx.post(f"{mock_url}/chat/completions", content=b"{not json")
    no_messages = httpx.post(f"{mock_url}/chat/completions", json={"model": "m", "messages": []})
    bad_model = httpx.post(f"{mock_url}/chat/completions", json={"model": 3, "messages": PROMPT})

    assert bad_json.status_code == 400
    assert bad_json.json()["error"]["type"] == "invalid_request_error"
    assert no_messages.status_code == 400
    assert no_messages.json()["error"]["param"] == "messages"
    assert bad_model.status_code == 400
    assert bad_model.json()["error"]["param"] == "model"


def test_anthropic_message_matches_the_openai_words(
    claude: anthropic.Anthropic, client: openai.OpenAI
) -> None:
    message = claude.messages.create(
        model="mock-large", max_tokens=100, system="You are terse", messages=PROMPT
    )
    openai_answer = client.chat.completions.create(model="mock-large", messages=PROMPT)

    assert message.id.startswith("msg_mock_")
    assert message.model == "mock-large"
    assert message.content[0].type == "text"
    assert message.content[0].text == openai_answer.choices[0].message.content
    assert message.stop_reason == "end_turn"
    assert message.usage.input_tokens == PROMPT_TOKENS + 3  # plus the system prompt's words
    assert message.usage.output_tokens == 16


def test_anthropic_stream_final_message_equals_non_stream(
    claude: anthropic.Anthropic,
) -> None:
    whole = claude.messages.create(model="mock-large", max_tokens=5, messages=PROMPT)
    with claude.messages.stream(model="mock-large", max_tokens=5, messages=PROMPT) as stream:
        pieces = list(stream.text_stream)
        final = stream.get_final_message()

    assert "".join(pieces) == final.content[0].text == whole.content[0].text
    assert final.stop_reason == whole.stop_reason == "max_tokens"
    assert final.usage.output_tokens == whole.usage.output_tokens == 5
    assert final.usage.input_tokens == whole.usage.input_tokens == PROMPT_TOKENS


def test_anthropic_missing_max_tokens_is_a_bad_request(
    claude: anthropic.Anthropic,
) -> None:
    # The SDK refuses to omit max_tokens itself, so post the raw body.
    with pytest.raises(anthropic.BadRequestError) as caught:
        claude.post(
            "/v1/messages",
            body={"model": "mock-large", "messages": PROMPT},
            cast_to=object,
        )

    assert caught.value.body == {
        "type": "error",
        "error": {
            "type": "invalid_request_error",
            "message": "max_tokens: Field required",
        },
    }


@pytest.mark.parametrize(
    ("status", "error", "error_type"),
    [
        (429, anthropic.RateLimitError, "rate_limit_error"),
        (500, anthropic.InternalServerError, "api_error"),
        (529, anthropic.OverloadedError, "overloaded_error"),
    ],
)
def test_anthropic_faults_use_the_anthropic_shape(
    claude: anthropic.Anthropic,
    status: int,
    error: type[anthropic.APIStatusError],
    error_type: str,
) -> None:
    with pytest.raises(error) as caught:
        claude.messages.create(
            model="mock-large",
            max_tokens=10,
            messages=PROMPT,
            extra_headers={"x-mock-fault": str(status)},
        )

    assert isinstance(caught.value.body, dict)
    assert caught.value.body["error"]["type"] == error_type


def test_anthropic_mid_stream_reset_raises_while_iterating(
    claude: anthropic.Anthropic,
) -> None:
    received: list[str] = []
    # Once a stream has started the anthropic SDK lets its HTTP library's ReadError
    # escape unwrapped, so match on the reset rather than on an SDK exception class.
    with (
        pytest.raises(Exception) as caught,
        claude.messages.stream(
            model="mock-large+fault=reset+tokens=8", max_tokens=100, messages=PROMPT
        ) as stream,
    ):
        received.extend(stream.text_stream)

    error = caught.value
    assert isinstance(error, anthropic.APIConnectionError) or "reset" in str(error).lower()
    assert len("".join(received).split(" ")) == 4


def test_request_log_records_bodies_and_headers(client: openai.OpenAI, root_url: str) -> None:
    assert httpx.delete(f"{root_url}/_mock/requests").status_code == 200
    client.chat.completions.create(
        model="mock-small", messages=PROMPT, extra_headers={"X-Trace": "abc"}
    )
    client.embeddings.create(model="mock-embed", input="hi")

    recorded = httpx.get(f"{root_url}/_mock/requests", params={"limit": 5}).json()
    assert [r["path"] for r in recorded] == ["/v1/chat/completions", "/v1/embeddings"]
    assert recorded[0]["method"] == "POST"
    assert recorded[0]["json"]["messages"] == PROMPT
    assert recorded[0]["headers"]["x-trace"] == "abc"
    assert recorded[0]["headers"]["authorization"] == "Bearer x"
    assert len(httpx.get(f"{root_url}/_mock/requests", params={"limit": 1}).json()) == 1


def test_required_key_rejects_requests_without_it() -> None:
    with mock_provider(require_key="sekret", tokens=3) as url:
        wrong = openai.OpenAI(base_url=url, api_key="wrong", max_retries=0)
        right = openai.OpenAI(base_url=url, api_key="sekret", max_retries=0)
        by_header = httpx.post(
            f"{url}/messages",
            headers={"x-api-key": "sekret"},
            json={"model": "m", "max_tokens": 5, "messages": PROMPT},
        )
        unauthenticated = httpx.post(
            f"{url}/messages", json={"model": "m", "max_tokens": 5, "messages": PROMPT}
        )

        with pytest.raises(openai.AuthenticationError):
            wrong.chat.completions.create(model="m", messages=PROMPT)
        answer = right.chat.completions.create(model="m", messages=PROMPT)

    assert len((answer.choices[0].message.content or "").split(" ")) == 3  # server default
    assert by_header.status_code == 200
    assert unauthenticated.status_code == 401
    assert unauthenticated.json()["error"]["type"] == "authentication_error"


TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}},
    {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}},
]
CLAUDE_TOOLS = [
    {"name": "get_weather", "input_schema": {"type": "object"}},
    {"name": "lookup", "input_schema": {"type": "object"}},
]


def planned_call() -> ToolCall:
    """The call the mock makes for PROMPT when both tools are offered (shared rule)."""
    call = plan_tool_call(
        tool_names=["get_weather", "lookup"],
        forced=None,
        answering_tool_result=False,
        prompt="Tell me about the mountains",
    )
    assert call is not None
    return call


def test_offered_tools_are_called_instead_of_answering(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(model="mock-small", messages=PROMPT, tools=TOOLS)

    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    assert choice.message.tool_calls is not None and len(choice.message.tool_calls) == 1
    call = choice.message.tool_calls[0]
    assert call.type == "function"
    assert call.id == planned_call().call_id
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"query": "Tell me about the mountains"}
    assert completion.usage is not None
    assert completion.usage.completion_tokens == planned_call().completion_tokens
    assert completion.usage.prompt_tokens == PROMPT_TOKENS


def test_streamed_tool_call_names_first_then_sends_arguments_in_pieces(
    client: openai.OpenAI,
) -> None:
    whole = client.chat.completions.create(model="mock-small", messages=PROMPT, tools=TOOLS)
    chunks = list(
        client.chat.completions.create(
            model="mock-small",
            messages=PROMPT,
            tools=TOOLS,
            stream=True,
            stream_options={"include_usage": True},
        )
    )

    deltas = [call for c in chunks if c.choices for call in c.choices[0].delta.tool_calls or []]
    opening, fragments = deltas[0], deltas[1:]
    expected = whole.choices[0].message.tool_calls
    assert expected is not None
    assert chunks[0].choices[0].delta.role == "assistant"
    assert (opening.index, opening.id, opening.type) == (0, expected[0].id, "function")
    assert opening.function is not None and opening.function.name == "get_weather"
    assert len(fragments) >= 2
    assert all(f.id is None and f.function and f.function.name is None for f in fragments)
    joined = "".join(f.function.arguments or "" for f in fragments if f.function)
    assert joined == expected[0].function.arguments
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
    assert chunks[-1].usage == whole.usage


def test_tool_choice_forces_a_tool_or_turns_tools_off(client: openai.OpenAI) -> None:
    forced = client.chat.completions.create(
        model="mock-small",
        messages=PROMPT,
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "lookup"}},
    )
    off = client.chat.completions.create(
        model="mock-small", messages=PROMPT, tools=TOOLS, tool_choice="none"
    )

    calls = forced.choices[0].message.tool_calls
    assert calls is not None and calls[0].function.name == "lookup"
    assert off.choices[0].finish_reason == "stop"
    assert off.choices[0].message.tool_calls is None


def test_a_tool_result_is_answered_with_text(client: openai.OpenAI) -> None:
    first = client.chat.completions.create(model="mock-small", messages=PROMPT, tools=TOOLS)
    calls = first.choices[0].message.tool_calls
    assert calls is not None
    answer = client.chat.completions.create(
        model="mock-small",
        tools=TOOLS,
        messages=[
            *PROMPT,
            first.choices[0].message.model_dump(exclude_none=True),  # type: ignore[list-item]
            {"role": "tool", "tool_call_id": calls[0].id, "content": "Sunny"},
        ],
    )

    assert answer.choices[0].finish_reason == "stop"
    assert answer.choices[0].message.tool_calls is None
    assert answer.choices[0].message.content


def test_anthropic_tool_use_matches_the_openai_call(claude: anthropic.Anthropic) -> None:
    message = claude.messages.create(
        model="mock-large", max_tokens=100, messages=PROMPT, tools=CLAUDE_TOOLS
    )

    assert message.stop_reason == "tool_use"
    assert len(message.content) == 1
    block = message.content[0]
    assert block.type == "tool_use"
    assert block.id == "toolu_" + planned_call().call_id.removeprefix("call_")
    assert block.name == "get_weather"
    assert block.input == planned_call().arguments
    assert message.usage.output_tokens == planned_call().completion_tokens


def test_anthropic_streamed_tool_use_equals_non_stream(claude: anthropic.Anthropic) -> None:
    whole = claude.messages.create(
        model="mock-large", max_tokens=100, messages=PROMPT, tools=CLAUDE_TOOLS
    )
    with claude.messages.stream(
        model="mock-large", max_tokens=100, messages=PROMPT, tools=CLAUDE_TOOLS
    ) as stream:
        events = list(stream)
        final = stream.get_final_message()

    starts = [e for e in events if e.type == "content_block_start"]
    pieces = [
        e.delta.partial_json
        for e in events
        if e.type == "content_block_delta" and e.delta.type == "input_json_delta"
    ]
    assert starts[0].content_block.type == "tool_use"
    assert starts[0].content_block.input == {}
    assert len(pieces) >= 2
    assert json.loads("".join(pieces)) == planned_call().arguments
    assert final.content == whole.content
    assert final.stop_reason == whole.stop_reason == "tool_use"
    assert final.usage.output_tokens == whole.usage.output_tokens


def test_anthropic_tool_choice_and_tool_results(claude: anthropic.Anthropic) -> None:
    forced = claude.messages.create(
        model="mock-large",
        max_tokens=100,
        messages=PROMPT,
        tools=CLAUDE_TOOLS,
        tool_choice={"type": "tool", "name": "lookup"},
    )
    off = claude.messages.create(
        model="mock-large",
        max_tokens=100,
        messages=PROMPT,
        tools=CLAUDE_TOOLS,
        tool_choice={"type": "none"},
    )
    block = forced.content[0]
    assert block.type == "tool_use" and block.name == "lookup"
    answered = claude.messages.create(
        model="mock-large",
        max_tokens=100,
        tools=CLAUDE_TOOLS,
        messages=[
            *PROMPT,
            {"role": "assistant", "content": [block.model_dump()]},
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": block.id, "content": "Sunny"}],
            },
        ],
    )

    assert off.stop_reason == "end_turn" and off.content[0].type == "text"
    assert answered.stop_reason == "end_turn"
    assert answered.content[0].type == "text"
