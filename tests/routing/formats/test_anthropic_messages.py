"""Translating Anthropic Messages requests to OpenAI chat and answers back."""

import orjson
import pytest

from billing.contracts import TokenUsage
from routing.errors import InvalidRequest
from routing.formats.anthropic_messages import (
    MessagesStreamTranslator,
    chat_payload_from_messages,
    message_from_completion,
)

BASE = {"model": "m", "max_tokens": 10}
USER = {"role": "user", "content": "hi"}


def test_full_request_translates_field_by_field() -> None:
    payload = chat_payload_from_messages({
        **BASE,
        "system": [{"type": "text", "text": "Be brief."}],
        "messages": [
            {"role": "user", "content": [
                {"type": "text", "text": "What is this?"},
                {"type": "image", "source": {"type": "base64", "media_type": "image/jpeg",
                                              "data": "QUJD"}},
            ]},
            {"role": "assistant", "content": [
                {"type": "text", "text": "Let me check."},
                {"type": "tool_use", "id": "toolu_1", "name": "look", "input": {"q": "x"}},
            ]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": "a cat"},
            ]},
        ],
        "temperature": 0.2, "top_p": 0.9, "stop_sequences": ["END"],
        "tools": [{"name": "look", "description": "d", "input_schema": {"type": "object"}}],
        "tool_choice": {"type": "tool", "name": "look", "disable_parallel_tool_use": True},
        "metadata": {"user_id": "u-1"}, "stream": True, "top_k": 5,
    })  # fmt: skip
    assert payload["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [
            {"type": "text", "text": "What is this?"},
            {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,QUJD"}},
        ]},
        {"role": "assistant", "content": "Let me check.", "tool_calls": [
            {"id": "toolu_1", "type": "function",
             "function": {"name": "look", "arguments": '{"q":"x"}'}},
        ]},
        {"role": "tool", "tool_call_id": "toolu_1", "content": "a cat"},
    ]  # fmt: skip
    assert payload["max_tokens"] == 10 and payload["stop"] == ["END"]
    assert payload["tools"][0]["function"]["parameters"] == {"type": "object"}
    assert payload["tool_choice"] == {"type": "function", "function": {"name": "look"}}
    assert payload["parallel_tool_calls"] is False
    assert payload["user"] == "u-1" and payload["stream"] is True
    # No OpenAI equivalent: kept by name so the route's parameter policy decides.
    assert payload["top_k"] == 5


@pytest.mark.parametrize(
    ("request_body", "param"),
    [
        ({"max_tokens": 5, "messages": [USER]}, "model"),
        ({"model": "m", "messages": [USER]}, "max_tokens"),
        ({**BASE, "max_tokens": True, "messages": [USER]}, "max_tokens"),
        ({**BASE, "messages": []}, "messages"),
        ({**BASE, "messages": "hi"}, "messages"),
        ({**BASE, "messages": [None]}, "messages[0].role"),
        ({**BASE, "messages": [{"role": "system", "content": "x"}]}, "messages[0].role"),
        ({**BASE, "messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ({**BASE, "messages": [{"role": "user", "content": [5]}]}, "messages[0].content[0]"),
        ({**BASE, "messages": [{"role": "user", "content": [{"type": "image"}]}]},
         "messages[0].content[0]"),
        ({**BASE, "messages": [{"role": "assistant", "content": [{"type": "x"}]}]},
         "messages[0].content[0]"),
        ({**BASE, "messages": [USER], "system": 7}, "system"),
        ({**BASE, "messages": [USER], "stop_sequences": "x"}, "stop_sequences"),
        ({**BASE, "messages": [USER], "tools": {}}, "tools"),
        ({**BASE, "messages": [USER], "tools": [{}]}, "tools[0]"),
        ({**BASE, "messages": [USER], "tool_choice": "auto"}, "tool_choice"),
        ({**BASE, "messages": [USER], "stream": "yes"}, "stream"),
    ],
)  # fmt: skip
def test_malformed_requests_are_400s_naming_the_field(request_body: dict, param: str) -> None:
    with pytest.raises(InvalidRequest) as raised:
        chat_payload_from_messages(request_body)
    assert raised.value.param == param


def test_completion_with_tool_calls_becomes_a_tool_use_message() -> None:
    body = orjson.dumps({
        "id": "chatcmpl-1", "model": "m", "choices": [{"index": 0, "finish_reason": "tool_calls",
        "message": {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "look", "arguments": '{"q": "x"}'}}]}}],
    })  # fmt: skip
    message = orjson.loads(
        message_from_completion(body, TokenUsage(input_tokens=10, cached_input_tokens=4,
                                                 output_tokens=3))
    )  # fmt: skip
    assert message["content"] == [
        {"type": "tool_use", "id": "call_1", "name": "look", "input": {"q": "x"}}
    ]
    assert message["stop_reason"] == "tool_use"
    assert message["usage"] == {
        "input_tokens": 6, "cache_read_input_tokens": 4, "cache_creation_input_tokens": 0,
        "output_tokens": 3,
    }  # fmt: skip


def test_stream_error_event_ends_the_anthropic_stream_without_a_stop() -> None:
    translator = MessagesStreamTranslator(model="m")
    chunk = {"id": "c", "choices": [{"index": 0, "delta": {"content": "Hi"}}]}
    out = b"".join(translator.feed(b"data: " + orjson.dumps(chunk) + b"\n\n"))
    out += b"".join(translator.feed(b'data: {"error": {"message": "lost"}}\n\n'))
    out += b"".join(translator.finish(TokenUsage(output_tokens=1)))
    names = [line[7:] for line in out.decode().splitlines() if line.startswith("event: ")]
    assert names == ["message_start", "content_block_start", "content_block_delta",
                     "content_block_stop", "error"]  # fmt: skip
