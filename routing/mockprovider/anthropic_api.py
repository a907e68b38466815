"""Anthropic-compatible endpoint: POST /v1/messages, streamed or not."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any, Final

import orjson
from aiohttp import web

from .content import Completion, plan_completion
from .errors import Family, MockError
from .options import resolve_options
from .responses import (
    StreamPlan,
    answer_with_fault,
    json_response,
    send_stream,
    sleep_ms,
    sse_event,
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


def parse_messages_request(body: dict[str, Any]) -> MessagesRequest:
    """Return the validated request, or raise a 400 MockError (max_tokens required)."""
    max_tokens = optional_int(body, "max_tokens", 1, 1 << 31)
    if max_tokens is None:
        raise MockError(400, "max_tokens: Field required", param="max_tokens")
    system = body.get("system")
    if system is not None and not isinstance(system, str | list):
        raise MockError(400, "system: must be a string or an array of text blocks")
    return MessagesRequest(
        model=required_str(body, "model"),
        messages=message_list(body),
        system=system,
        max_tokens=max_tokens,
        stream=optional_bool(body, "stream"),
    )


def _usage(completion: Completion, output_tokens: int) -> dict[str, int]:
    return {
        "input_tokens": completion.prompt_tokens,
        "output_tokens": output_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
    }


def _message(model: str, completion: Completion, *, streaming: bool) -> dict[str, Any]:
    """Return the Message object; at stream start it is empty, as Anthropic sends it."""
    stop_reason = "max_tokens" if completion.capped else "end_turn"
    return {
        "id": f"msg_mock_{secrets.token_hex(12)}",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [] if streaming else [{"type": "text", "text": completion.text}],
        "stop_reason": None if streaming else stop_reason,
        "stop_sequence": None,
        "usage": _usage(completion, 1 if streaming else len(completion.words)),
    }


def _stream_plan(model: str, completion: Completion) -> StreamPlan:
    """Return the documented Messages event sequence for `completion`."""
    stop_reason = "max_tokens" if completion.capped else "end_turn"
    return StreamPlan(
        head=[
            sse_event(
                "message_start",
                {
                    "type": "message_start",
                    "message": _message(model, completion, streaming=True),
                },
            ),
            sse_event(
                "content_block_start",
                {
                    "type": "content_block_start",
                    "index": 0,
                    "content_block": {"type": "text", "text": ""},
                },
            ),
            sse_event("ping", {"type": "ping"}),
        ],
        # Pre-encoded around the text: deltas are most of a stream's encoding work.
        words=[
            b"".join((_DELTA_OPENING, orjson.dumps(delta), b"}}\n\n"))
            for delta in completion.deltas()
        ],
        tail=[
            sse_event("content_block_stop", {"type": "content_block_stop", "index": 0}),
            sse_event(
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": stop_reason, "stop_sequence": None},
                    "usage": {"output_tokens": len(completion.words)},
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
    if parsed.stream:
        return await send_stream(
            request, options, Family.ANTHROPIC, _stream_plan(model, completion)
        )
    if options.fault is not None:
        return await answer_with_fault(request, options)
    await sleep_ms(options.latency_ms)
    return json_response(_message(model, completion, streaming=False))
