"""OpenAI-compatible endpoints: chat completions, embeddings and the model list."""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from typing import Any, Final

import orjson
from aiohttp import web

from .content import (
    Completion,
    ToolCall,
    count_words,
    embedding_base64,
    embedding_vector,
    last_user_text,
    plan_completion,
    plan_tool_call,
)
from .errors import Family, MockError
from .options import MAX_DIMENSIONS, MockOptions, resolve_options
from .responses import (
    StreamPlan,
    answer_with_fault,
    json_response,
    send_stream,
    sleep_ms,
    sse_data,
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

MODEL_IDS: Final = ("mock-small", "mock-large", "mock-embed")
# A fixed creation time keeps the model list byte-for-byte stable.
MODELS_CREATED: Final = 1_700_000_000
MAX_CHOICES: Final = 128


@dataclass(frozen=True, slots=True)
class ChatRequest:
    """The fields of a chat completion request the mock acts on."""

    model: str
    messages: list[dict[str, Any]]
    stream: bool
    include_usage: bool
    max_tokens: int | None
    n: int
    tool_names: tuple[str, ...]  # empty when no tools are offered or tool_choice is "none"
    forced_tool: str | None


def _tool_names(body: dict[str, Any]) -> tuple[str, ...]:
    """Return the offered function names, or raise a 400 if `tools` is not an array."""
    tools = body.get("tools")
    if tools is None:
        return ()
    if not isinstance(tools, list):
        raise MockError(400, "tools: must be an array", param="tools")
    names = []
    for tool in tools:
        function = tool.get("function") if isinstance(tool, dict) else None
        name = function.get("name") if isinstance(function, dict) else None
        if isinstance(name, str) and name:
            names.append(name)
    return tuple(names)


def _forced_tool(tool_choice: object) -> str | None:
    """Return the function name a `{"type": "function", ...}` tool_choice forces, if any."""
    function = tool_choice.get("function") if isinstance(tool_choice, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    return name if isinstance(name, str) else None


def parse_chat_request(body: dict[str, Any]) -> ChatRequest:
    """Return the validated chat request, or raise a 400 naming the bad field."""
    stream_options = body.get("stream_options")
    if stream_options is not None and not isinstance(stream_options, dict):
        raise MockError(400, "stream_options: must be an object", param="stream_options")
    max_tokens = optional_int(body, "max_completion_tokens", 1, 1 << 31)
    if max_tokens is None:
        max_tokens = optional_int(body, "max_tokens", 1, 1 << 31)
    return ChatRequest(
        model=required_str(body, "model"),
        messages=message_list(body),
        stream=optional_bool(body, "stream"),
        include_usage=optional_bool(stream_options or {}, "include_usage"),
        max_tokens=max_tokens,
        n=optional_int(body, "n", 1, MAX_CHOICES) or 1,
        tool_names=() if body.get("tool_choice") == "none" else _tool_names(body),
        forced_tool=_forced_tool(body.get("tool_choice")),
    )


def _tool_call_for(chat: ChatRequest) -> ToolCall | None:
    """Return the tool call the mock answers `chat` with, or None to answer with text."""
    return plan_tool_call(
        tool_names=chat.tool_names,
        forced=chat.forced_tool,
        answering_tool_result=chat.messages[-1].get("role") == "tool",
        prompt=last_user_text(chat.messages),
    )


def _usage(completion: Completion, n: int, call: ToolCall | None = None) -> dict[str, int]:
    completion_tokens = (call.completion_tokens if call else len(completion.words)) * n
    return {
        "prompt_tokens": completion.prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": completion.prompt_tokens + completion_tokens,
    }


def _tool_call_object(call: ToolCall, arguments: str) -> dict[str, Any]:
    """Return the call as OpenAI's `tool_calls[]` entry with `arguments` as given."""
    return {
        "id": call.call_id,
        "type": "function",
        "function": {"name": call.name, "arguments": arguments},
    }


def _chat_stream_plan(
    chat: ChatRequest, model: str, completion: Completion, call: ToolCall | None
) -> StreamPlan:
    """Return the chunks OpenAI would stream, `n` choices interleaved."""
    frame: dict[str, Any] = {
        "id": f"chatcmpl-mock-{secrets.token_hex(12)}",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
    }
    if chat.include_usage:
        frame["usage"] = None

    # Chunks differ only in their choice, so splice it into the pre-encoded frame: a
    # stream is mostly chunk encoding, and the mock must not be a benchmark's bottleneck.
    opening = b"data: " + orjson.dumps(frame)[:-1] + b',"choices":[{"index":'

    def chunk(index: int, delta: dict[str, Any], finish_reason: str | None) -> bytes:
        return b"".join(
            (
                opening,
                str(index).encode(),
                b',"delta":',
                orjson.dumps(delta),
                b',"logprobs":null,"finish_reason":',
                orjson.dumps(finish_reason),
                b"}]}\n\n",
            )
        )

    choices = range(chat.n)
    if call is not None:
        finish_reason = "tool_calls"
        # As OpenAI sends it: the role with the call's id and name, then argument pieces.
        opening_call = {"index": 0, **_tool_call_object(call, "")}
        head = [
            chunk(index, {"role": "assistant", "content": None, "tool_calls": [opening_call]}, None)
            for index in choices
        ]
        deltas = [
            {"tool_calls": [{"index": 0, "function": {"arguments": piece}}]}
            for piece in text_fragments(call.arguments_json())
        ]
    else:
        finish_reason = "length" if completion.capped else "stop"
        head = [chunk(index, {"role": "assistant", "content": ""}, None) for index in choices]
        deltas = [{"content": delta} for delta in completion.deltas()]
    tail = [chunk(index, {}, finish_reason) for index in choices]
    if chat.include_usage:
        usage = _usage(completion, chat.n, call)
        tail.append(sse_data({**frame, "choices": [], "usage": usage}))
    tail.append(b"data: [DONE]\n\n")
    return StreamPlan(
        head=head,
        words=[b"".join(chunk(index, delta, None) for index in choices) for delta in deltas],
        tail=tail,
    )


async def chat_completions(request: web.Request) -> web.StreamResponse:
    """Answer POST /v1/chat/completions deterministically, streamed or not."""
    chat = parse_chat_request(body_object(request))
    model, options = resolve_options(
        request.app[STATE].defaults, chat.model, request.headers.items()
    )
    completion = plan_completion(
        model=model,
        messages=chat.messages,
        system=None,
        tokens=options.tokens,
        max_tokens=None if options.ignore_max_tokens else chat.max_tokens,
    )
    call = _tool_call_for(chat)
    if chat.stream:
        plan = _chat_stream_plan(chat, model, completion, call)
        if options.pad_bytes:
            # An SSE comment: clients ignore it, but must receive it whole first.
            padding = b": " + b"x" * options.pad_bytes + b"\n\n"
            plan = StreamPlan(head=plan.head, words=[padding, *plan.words], tail=plan.tail)
        return await send_stream(request, options, Family.OPENAI, plan)
    if options.fault is not None:
        return await answer_with_fault(request, options)
    await sleep_ms(options.latency_ms)
    message: dict[str, Any]
    if call is not None:
        message = {
            "role": "assistant",
            "content": None,
            "tool_calls": [_tool_call_object(call, call.arguments_json())],
        }
        finish_reason = "tool_calls"
    else:
        message = {"role": "assistant", "content": completion.text}
        finish_reason = "length" if completion.capped else "stop"
    padding = {"mock_padding": "x" * options.pad_bytes} if options.pad_bytes else {}
    return json_response(
        {
            **padding,
            "id": f"chatcmpl-mock-{secrets.token_hex(12)}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [
                {
                    "index": index,
                    "message": message,
                    "finish_reason": finish_reason,
                    "logprobs": None,
                }
                for index in range(chat.n)
            ],
            "usage": _usage(completion, chat.n, call),
        }
    )


def _embedding_inputs(value: object) -> list[str | list[int]]:
    """Return the inputs to embed: a string, strings, one token list, or token lists."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value:
        if all(isinstance(item, str) for item in value):
            return list(value)
        if all(isinstance(item, int) and not isinstance(item, bool) for item in value):
            return [value]
        if all(
            isinstance(item, list)
            and item
            and all(isinstance(token, int) and not isinstance(token, bool) for token in item)
            for item in value
        ):
            return list(value)
    raise MockError(
        400,
        "input: must be a string, an array of strings, an array of integers "
        "or an array of integer arrays",
        param="input",
    )


def _embedding_options(body: dict[str, Any], defaults: MockOptions) -> tuple[int, bool]:
    """Return the vector size and whether to encode as base64 (both validated)."""
    dimensions = optional_int(body, "dimensions", 1, MAX_DIMENSIONS) or defaults.dimensions
    encoding = body.get("encoding_format")
    if encoding not in (None, "float", "base64"):
        raise MockError(400, "encoding_format: must be float or base64", param="encoding_format")
    return dimensions, encoding == "base64"


async def embeddings(request: web.Request) -> web.StreamResponse:
    """Answer POST /v1/embeddings with deterministic unit vectors."""
    body = body_object(request)
    inputs = _embedding_inputs(body.get("input"))
    model, options = resolve_options(
        request.app[STATE].defaults,
        required_str(body, "model"),
        request.headers.items(),
    )
    dimensions, as_base64 = _embedding_options(body, options)
    if options.fault is not None:
        return await answer_with_fault(request, options)
    await sleep_ms(options.latency_ms)
    data = []
    for index, item in enumerate(inputs):
        vector = embedding_vector(item, dimensions)
        encoded: object = embedding_base64(vector) if as_base64 else vector
        data.append({"object": "embedding", "index": index, "embedding": encoded})
    prompt_tokens = sum(
        count_words(item) if isinstance(item, str) else len(item) for item in inputs
    )
    return json_response(
        {
            "object": "list",
            "data": data,
            "model": model,
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
        }
    )


def _model_object(model_id: str) -> dict[str, object]:
    return {
        "id": model_id,
        "object": "model",
        "created": MODELS_CREATED,
        "owned_by": "mock",
    }


async def list_models(request: web.Request) -> web.StreamResponse:
    """Answer GET /v1/models with the mock's fixed model list."""
    return json_response({"object": "list", "data": [_model_object(m) for m in MODEL_IDS]})


async def retrieve_model(request: web.Request) -> web.StreamResponse:
    """Answer GET /v1/models/{model} for any model id (the mock serves every name)."""
    return json_response(_model_object(request.match_info["model"]))
