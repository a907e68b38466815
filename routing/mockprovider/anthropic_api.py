"""Anthropic-compatible endpoint: POST /v1/messages, streamed or not."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any, Final

import orjson
from aiohttp import web

from .content import Completion, ToolCall, last_user_text, plan_completion, plan_tool_call
from .errors import Family, MockError
from .options import resolve_options
from .responses import (
    StreamPlan,
    answer_with_fault,
    json_response,
    send_stream,
    sleep_ms,
    sse_event,
    text_fragments,
)
from .state import STATE
from .validation import (
    body_object,
    message_list,
    optional_bool,
    optional_int,
    required_str,
)

_DELTA_OPENING: Final = (
    b"event: content_block_delta\n"
    b'data: {"type":"content_block_delta","index":0,'
    b'"delta":{"type":"text_delta","text":'
)


@dataclass(frozen=True, slots=True)
class MessagesRequest:
    """The fields of an Anthropic Messages request the mock acts on."""

    model: str
    messages: list[dict[str, Any]]
    system: object
    max_tokens: int
    stream: bool
    tool_names: tuple[str, ...]  # empty when no tools are offered or tool_choice is none
    forced_tool: str | None


def _tool_names(body: dict[str, Any]) -> tuple[str, ...]:
    """Return the offered tool names, or raise a 400 if `tools` is not an array."""
    tools = body.get("tools")
    if tools is None:
        return ()
    if not isinstance(tools, list):
        raise MockError(400, "tools: Input should be a valid list", param="tools")
    return tuple(
        tool["name"]
        for tool in tools
        if isinstance(tool, dict) and isinstance(tool.get("name"), str) and tool["name"]
    )


def _answering_tool_result(messages: list[dict[str, Any]]) -> bool:
    """Whether the last message is a user turn carrying a tool_result block."""
    last = messages[-1]
    content = last.get("content")
    return (
        last.get("role") == "user"
        and isinstance(content, list)
        and any(isinstance(block, dict) and block.get("type") == "tool_result" for block in content)
    )


def parse_messages_request(body: dict[str, Any]) -> MessagesRequest:
    """Return the validated request, or raise a 400 MockError (max_tokens required)."""
    max_tokens = optional_int(body, "max_tokens", 1, 1 << 31)
    if max_tokens is None:
        raise MockError(400, "max_tokens: Field required", param="max_tokens")
    system = body.get("system")
    if system is not None and not isinstance(system, str | list):
        raise MockError(400, "system: must be a string or an array of text blocks")
    tool_choice = body.get("tool_choice")
    choice = tool_choice if isinstance(tool_choice, dict) else {}
    forced = choice.get("name") if choice.get("type") == "tool" else None
    return MessagesRequest(
        model=required_str(body, "model"),
        messages=message_list(body),
        system=system,
        max_tokens=max_tokens,
        stream=optional_bool(body, "stream"),
        tool_names=() if choice.get("type") == "none" else _tool_names(body),
        forced_tool=forced if isinstance(forced, str) else None,
    )


def _tool_use_block(call: ToolCall, *, streaming: bool) -> dict[str, Any]:
    """Return `call` as a tool_use block; a stream opens it with empty input."""
    return {
        "type": "tool_use",
        "id": "toolu_" + call.call_id.removeprefix("call_"),
        "name": call.name,
        "input": {} if streaming else call.arguments,
    }


@dataclass(frozen=True, slots=True)
class Answer:
    """What the mock replies: the completion's text, or a tool call instead."""

    completion: Completion
    call: ToolCall | None

    @property
    def stop_reason(self) -> str:
        """Return tool_use for a call, else max_tokens or end_turn."""
        if self.call is not None:
            return "tool_use"
        return "max_tokens" if self.completion.capped else "end_turn"

    @property
    def output_tokens(self) -> int:
        """Return the answer's output tokens: the call's cost, else one per word."""
        return self.call.completion_tokens if self.call else len(self.completion.words)

    def content(self) -> list[dict[str, Any]]:
        """Return the finished Message's content blocks."""
        if self.call is not None:
            return [_tool_use_block(self.call, streaming=False)]
        return [{"type": "text", "text": self.completion.text}]


def _usage(completion: Completion, output_tokens: int) -> dict[str, int]:
    return {
        "input_tokens": completion.prompt_tokens,
        "output_tokens": output_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
    }


def _message(model: str, answer: Answer, *, streaming: bool) -> dict[str, Any]:
    """Return the Message object; at stream start it is empty, as Anthropic sends it."""
    return {
        "id": f"msg_mock_{secrets.token_hex(12)}",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [] if streaming else answer.content(),
        "stop_reason": None if streaming else answer.stop_reason,
        "stop_sequence": None,
        "usage": _usage(answer.completion, 1 if streaming else answer.output_tokens),
    }


def _stream_plan(model: str, answer: Answer) -> StreamPlan:
    """Return the documented Messages event sequence for `answer`."""
    words: list[bytes]
    if answer.call is not None:
        block = _tool_use_block(answer.call, streaming=True)
        words = [
            sse_event(
                "content_block_delta",
                {
                    "type": "content_block_delta",
                    "index": 0,
                    "delta": {"type": "input_json_delta", "partial_json": piece},
                },
            )
            for piece in text_fragments(answer.call.arguments_json())
        ]
    else:
        block = {"type": "text", "text": ""}
        # Pre-encoded around the text: deltas are most of a stream's encoding work.
        words = [
            b"".join((_DELTA_OPENING, orjson.dumps(delta), b"}}\n\n"))
            for delta in answer.completion.deltas()
        ]
    return StreamPlan(
        head=[
            sse_event(
                "message_start",
                {
                    "type": "message_start",
                    "message": _message(model, answer, streaming=True),
                },
            ),
            sse_event(
                "content_block_start",
                {"type": "content_block_start", "index": 0, "content_block": block},
            ),
            sse_event("ping", {"type": "ping"}),
        ],
        words=words,
        tail=[
            sse_event("content_block_stop", {"type": "content_block_stop", "index": 0}),
            sse_event(
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": answer.stop_reason, "stop_sequence": None},
                    "usage": {"output_tokens": answer.output_tokens},
                },
            ),
            sse_event("message_stop", {"type": "message_stop"}),
        ],
    )


async def messages(request: web.Request) -> web.StreamResponse:
    """Answer POST /v1/messages with a deterministic Message, streamed or not."""
    parsed = parse_messages_request(body_object(request))
    model, options = resolve_options(
        request.app[STATE].defaults, parsed.model, request.headers.items()
    )
    completion = plan_completion(
        model=model,
        messages=parsed.messages,
        system=parsed.system,
        tokens=options.tokens,
        max_tokens=parsed.max_tokens,
    )
    # A tool call ignores max_tokens: its arguments are short and a cut call is useless.
    call = plan_tool_call(
        tool_names=parsed.tool_names,
        forced=parsed.forced_tool,
        answering_tool_result=_answering_tool_result(parsed.messages),
        prompt=last_user_text(parsed.messages),
    )
    answer = Answer(completion=completion, call=call)
    if parsed.stream:
        return await send_stream(request, options, Family.ANTHROPIC, _stream_plan(model, answer))
    if options.fault is not None:
        return await answer_with_fault(request, options)
    await sleep_ms(options.latency_ms)
    return json_response(_message(model, answer, streaming=False))
