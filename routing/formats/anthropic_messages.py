"""Anthropic Messages as an inbound format: translate to and from OpenAI chat.

The proxy speaks OpenAI chat internally, so `/v1/messages` requests become
OpenAI chat payloads for whichever provider serves the route, and the answers
(complete or streamed) come back in Anthropic's shapes.
"""

import json
import uuid
from collections.abc import Iterator
from typing import Any

import orjson

from billing.contracts import TokenUsage
from routing.errors import InvalidRequest

_STOP_REASONS = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "refusal",
}


def _stop_reason(finish_reason: object) -> str:
    """Anthropic's stop reason for an OpenAI `finish_reason` (anything odd: end_turn)."""
    if not isinstance(finish_reason, str):
        return "end_turn"
    return _STOP_REASONS.get(finish_reason, "end_turn")


_TOOL_CHOICES = {"auto": "auto", "any": "required", "none": "none"}


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _text_of_blocks(content: object, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for block in content:
            if not isinstance(block, dict) or block.get("type") != "text":
                raise InvalidRequest(f"'{where}' may only hold text blocks.", param=where)
            texts.append(str(block.get("text", "")))
        return "\n".join(texts)
    raise InvalidRequest(f"'{where}' must be a string or an array of blocks.", param=where)


def _image_part(block: dict[str, Any], where: str) -> dict[str, Any]:
    source = block.get("source")
    if isinstance(source, dict) and source.get("type") == "base64":
        url = f"data:{source.get('media_type', 'image/png')};base64,{source.get('data', '')}"
    elif isinstance(source, dict) and source.get("type") == "url":
        url = str(source.get("url", ""))
    else:
        raise InvalidRequest(f"'{where}.source' must be a base64 or url source.", param=where)
    return {"type": "image_url", "image_url": {"url": url}}


def _user_messages(content: object, where: str) -> list[dict[str, Any]]:
    """One Anthropic user turn as OpenAI messages: tool results become `tool` messages."""
    if isinstance(content, str):
        return [{"role": "user", "content": content}]
    if not isinstance(content, list) or not content:
        raise InvalidRequest(f"'{where}' must be a string or a non-empty array.", param=where)
    messages: list[dict[str, Any]] = []
    parts: list[dict[str, Any]] = []
    for index, block in enumerate(content):
        block_where = f"{where}[{index}]"
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            parts.append({"type": "text", "text": str(block.get("text", ""))})
        elif kind == "image":
            parts.append(_image_part(block, block_where))
        elif kind == "tool_result":
            result = block.get("content", "")
            text = result if isinstance(result, str) else _text_of_blocks(result, block_where)
            messages.append(
                {"role": "tool", "tool_call_id": str(block.get("tool_use_id", "")), "content": text}
            )
        else:
            raise InvalidRequest(f"'{block_where}.type' is not supported here.", param=block_where)
    if parts:
        messages.append({"role": "user", "content": parts})
    return messages


def _assistant_message(content: object, where: str) -> dict[str, Any]:
    if isinstance(content, str):
        return {"role": "assistant", "content": content}
    if not isinstance(content, list):
        raise InvalidRequest(f"'{where}' must be a string or an array of blocks.", param=where)
    texts, tool_calls = [], []
    for index, block in enumerate(content):
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            texts.append(str(block.get("text", "")))
        elif kind == "tool_use":
            tool_calls.append(
                {
                    "id": str(block.get("id", "")),
                    "type": "function",
                    "function": {
                        "name": str(block.get("name", "")),
                        "arguments": json.dumps(block.get("input") or {}, separators=(",", ":")),
                    },
                }
            )
        elif kind not in ("thinking", "redacted_thinking"):
            raise InvalidRequest(
                f"'{where}[{index}].type' is not supported here.", param=f"{where}[{index}]"
            )
    message: dict[str, Any] = {"role": "assistant", "content": "".join(texts) or None}
    if tool_calls:
        message["tool_calls"] = tool_calls
    return message


def _tools(tools: object) -> list[dict[str, Any]]:
    if not isinstance(tools, list):
        raise InvalidRequest("'tools' must be an array.", param="tools")
    converted = []
    for index, tool in enumerate(tools):
        if not isinstance(tool, dict) or not isinstance(tool.get("name"), str):
            raise InvalidRequest(f"'tools[{index}].name' is required.", param=f"tools[{index}]")
        function = {"name": tool["name"], "parameters": tool.get("input_schema") or {}}
        if tool.get("description"):
            function["description"] = tool["description"]
        converted.append({"type": "function", "function": function})
    return converted


def _tool_choice(choice: object, payload: dict[str, Any]) -> None:
    if not isinstance(choice, dict) or choice.get("type") not in (*_TOOL_CHOICES, "tool"):
        raise InvalidRequest(
            "'tool_choice.type' must be auto, any, tool or none.", param="tool_choice"
        )
    if choice["type"] == "tool":
        payload["tool_choice"] = {"type": "function", "function": {"name": choice.get("name")}}
    else:
        payload["tool_choice"] = _TOOL_CHOICES[choice["type"]]
    if choice.get("disable_parallel_tool_use"):
        payload["parallel_tool_calls"] = False


def chat_payload_from_messages(data: dict[str, Any]) -> dict[str, Any]:
    """The OpenAI chat payload for an Anthropic Messages request; 400 naming bad fields.

    Anthropic-only fields with no OpenAI equivalent (top_k, thinking, ...) are
    carried under their own names, so the route's unsupported-parameter policy
    decides whether they are refused or dropped.
    """
    model = data.get("model")
    if not isinstance(model, str) or not model.strip():
        raise InvalidRequest("'model' is required and must be a non-empty string.", param="model")
    max_tokens = data.get("max_tokens")
    if not _is_int(max_tokens) or max_tokens < 1:
        raise InvalidRequest(
            "'max_tokens' is required and must be a positive integer.", param="max_tokens"
        )
    turns = data.get("messages")
    if not isinstance(turns, list) or not turns:
        raise InvalidRequest("'messages' must be a non-empty array.", param="messages")

    messages: list[dict[str, Any]] = []
    if data.get("system"):
        messages.append({"role": "system", "content": _text_of_blocks(data["system"], "system")})
    for index, turn in enumerate(turns):
        where = f"messages[{index}]"
        role = turn.get("role") if isinstance(turn, dict) else None
        if role == "user":
            messages.extend(_user_messages(turn.get("content"), f"{where}.content"))
        elif role == "assistant":
            messages.append(_assistant_message(turn.get("content"), f"{where}.content"))
        else:
            raise InvalidRequest(
                f"'{where}.role' must be user or assistant.", param=f"{where}.role"
            )

    payload: dict[str, Any] = {"model": model, "messages": messages, "max_tokens": max_tokens}
    for name in ("temperature", "top_p"):
        if data.get(name) is not None:
            payload[name] = data[name]
    if data.get("stop_sequences") is not None:
        stops = data["stop_sequences"]
        if not isinstance(stops, list) or not all(isinstance(stop, str) for stop in stops):
            raise InvalidRequest(
                "'stop_sequences' must be an array of strings.", param="stop_sequences"
            )
        payload["stop"] = stops
    if data.get("tools") is not None:
        payload["tools"] = _tools(data["tools"])
    if data.get("tool_choice") is not None:
        _tool_choice(data["tool_choice"], payload)
    metadata = data.get("metadata")
    if isinstance(metadata, dict) and isinstance(metadata.get("user_id"), str):
        payload["user"] = metadata["user_id"]
    if data.get("stream") is not None:
        if not isinstance(data["stream"], bool):
            raise InvalidRequest("'stream' must be a boolean.", param="stream")
        payload["stream"] = data["stream"]
    known = {"model", "max_tokens", "messages", "system", "temperature", "top_p", "stop_sequences",
             "tools", "tool_choice", "metadata", "stream"}  # fmt: skip
    for name, value in data.items():
        if name not in known:
            payload[name] = value
    return payload


def _anthropic_usage(usage: TokenUsage) -> dict[str, int]:
    return {
        "input_tokens": usage.input_tokens - usage.cached_input_tokens,
        "cache_read_input_tokens": usage.cached_input_tokens,
        "cache_creation_input_tokens": 0,
        "output_tokens": usage.output_tokens,
    }


def _tool_input(arguments: str) -> Any:
    try:
        return orjson.loads(arguments or "{}")
    except orjson.JSONDecodeError:
        return {}


def message_from_completion(body: bytes, usage: TokenUsage) -> bytes:
    """An Anthropic Message for an OpenAI chat.completion body."""
    completion = orjson.loads(body)
    choice = (completion.get("choices") or [{}])[0]
    message = choice.get("message") or {}
    content: list[dict[str, Any]] = []
    if message.get("content"):
        content.append({"type": "text", "text": message["content"]})
    for call in message.get("tool_calls") or []:
        function = call.get("function") or {}
        content.append(
            {
                "type": "tool_use",
                "id": call.get("id") or f"toolu_{uuid.uuid4().hex[:24]}",
                "name": function.get("name", ""),
                "input": _tool_input(function.get("arguments", "")),
            }
        )
    return orjson.dumps(
        {
            "id": _message_id(str(completion.get("id") or "")),
            "type": "message",
            "role": "assistant",
            "model": completion.get("model", ""),
            "content": content,
            "stop_reason": _stop_reason(choice.get("finish_reason") or "stop"),
            "stop_sequence": None,
            "usage": _anthropic_usage(usage),
        }
    )


def _message_id(upstream_id: str) -> str:
    if upstream_id.startswith("msg_"):
        return upstream_id
    return f"msg_{upstream_id or uuid.uuid4().hex}"


def _event(name: str, data: dict[str, Any]) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps({"type": name, **data}) + b"\n\n"


class MessagesStreamTranslator:
    """Turns OpenAI chat.completion.chunk SSE into Anthropic Messages stream events."""

    def __init__(self, *, model: str) -> None:
        self._model = model
        self._started = False
        self._open_block: str | None = None  # "text" or a tool call's index
        self._block_index = -1
        self._stop_reason: str | None = None
        self._failed = False
        self._buffer = b""

    def _start(self, message_id: str) -> Iterator[bytes]:
        self._started = True
        yield _event(
            "message_start",
            {
                "message": {
                    "id": _message_id(message_id), "type": "message",
                    "role": "assistant", "model": self._model, "content": [],
                    "stop_reason": None, "stop_sequence": None,
                    "usage": {"input_tokens": 0, "output_tokens": 0},
                }
            },
        )  # fmt: skip

    def _close_block(self) -> Iterator[bytes]:
        if self._open_block is not None:
            yield _event("content_block_stop", {"index": self._block_index})
            self._open_block = None

    def _open(self, key: str, block: dict[str, Any]) -> Iterator[bytes]:
        yield from self._close_block()
        self._block_index += 1
        self._open_block = key
        yield _event("content_block_start", {"index": self._block_index, "content_block": block})

    def _chunk(self, chunk: dict[str, Any]) -> Iterator[bytes]:
        if not self._started:
            yield from self._start(str(chunk.get("id", "")))
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            if delta.get("content"):
                if self._open_block != "text":
                    yield from self._open("text", {"type": "text", "text": ""})
                yield _event(
                    "content_block_delta",
                    {"index": self._block_index,
                     "delta": {"type": "text_delta", "text": delta["content"]}},
                )  # fmt: skip
            for call in delta.get("tool_calls") or []:
                key = f"tool-{call.get('index', 0)}"
                function = call.get("function") or {}
                if self._open_block != key:
                    block = {
                        "type": "tool_use",
                        "id": call.get("id") or f"toolu_{uuid.uuid4().hex}",
                        "name": function.get("name", ""),
                        "input": {},
                    }
                    yield from self._open(key, block)
                if function.get("arguments"):
                    yield _event(
                        "content_block_delta",
                        {"index": self._block_index,
                         "delta": {"type": "input_json_delta",
                                   "partial_json": function["arguments"]}},
                    )  # fmt: skip
            if choice.get("finish_reason"):
                self._stop_reason = _stop_reason(choice["finish_reason"])

    def feed(self, data: bytes) -> Iterator[bytes]:
        """Anthropic events for the complete OpenAI SSE events in `data`."""
        self._buffer += data
        *events, self._buffer = self._buffer.split(b"\n\n")
        for event in events:
            if not event.startswith(b"data: ") or event == b"data: [DONE]":
                continue
            try:
                chunk = orjson.loads(event[6:])
            except orjson.JSONDecodeError:
                continue
            if isinstance(chunk, dict) and "error" in chunk:
                # The proxy's own mid-stream error event: say it the Anthropic way.
                self._failed = True
                yield from self._close_block()
                error = chunk["error"] if isinstance(chunk["error"], dict) else {}
                yield _event(
                    "error",
                    {"error": {"type": "api_error", "message": error.get("message", "error")}},
                )
                continue
            if isinstance(chunk, dict):
                yield from self._chunk(chunk)

    def finish(self, usage: TokenUsage) -> Iterator[bytes]:
        """The closing events with the final usage; nothing after an error event."""
        if self._failed:
            return
        if not self._started:
            yield from self._start("")
        yield from self._close_block()
        yield _event(
            "message_delta",
            {"delta": {"stop_reason": self._stop_reason or "end_turn", "stop_sequence": None},
             "usage": _anthropic_usage(usage)},
        )  # fmt: skip
        yield _event("message_stop", {})
