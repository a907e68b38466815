"""Pure translation between OpenAI chat completions and Anthropic Messages (no I/O).

The gateway speaks OpenAI internally: requests are translated to a Messages
body, and answers (complete or streamed) back to OpenAI's shapes, so clients
never see Anthropic's format unless they asked for it at the edge.
"""

import time
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, Final

import orjson

from billing.contracts import TokenUsage
from routing.errors import UpstreamError, UpstreamMalformed, UpstreamRateLimited, UpstreamRejected
from routing.providers.openai_payload import (
    chunk_choice,
    chunk_event,
    completion_choice,
    completion_object,
    data_url,
    image_url,
    invalid,
    max_tokens,
    openai_usage,
    stop_sequences,
    text_of,
    tool_call,
)
from routing.providers.upstream import mid_stream_error, translate_events

# Anthropic requires max_tokens; OpenAI lets clients omit it.
DEFAULT_MAX_TOKENS: Final = 4096
_FINISH_REASONS: Final[Mapping[str, str]] = MappingProxyType(
    {
        "end_turn": "stop",
        "stop_sequence": "stop",
        "pause_turn": "stop",
        "max_tokens": "length",
        "model_context_window_exceeded": "length",
        "tool_use": "tool_calls",
        "refusal": "content_filter",
    }
)
_TOOL_CHOICES: Final[Mapping[str, str]] = MappingProxyType(
    {"auto": "auto", "required": "any", "none": "none"}
)
_STREAM_ERRORS: Final[Mapping[str, type[UpstreamError]]] = MappingProxyType(
    {
        "rate_limit_error": UpstreamRateLimited,
        "invalid_request_error": UpstreamRejected,
        "request_too_large": UpstreamRejected,
    }
)


def _image_block(part: dict[str, Any], where: str) -> dict[str, Any]:
    """An Anthropic image block for an OpenAI `image_url` part (data: or http(s) URL)."""
    url = image_url(part)
    if not isinstance(url, str):
        raise invalid(f"'{where}.image_url.url' must be a string.", where)
    if url.startswith("data:"):
        media_type, data = data_url(url, f"{where}.image_url.url", param=where)
        return {
            "type": "image",
            "source": {"type": "base64", "media_type": media_type, "data": data},
        }
    if url.startswith(("https://", "http://")):
        return {"type": "image", "source": {"type": "url", "url": url}}
    raise invalid(f"'{where}.image_url.url' must be an http(s) or data URL.", where)


def _user_content(content: object, where: str) -> str | list[dict[str, Any]]:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise invalid(f"'{where}' must be a string or an array of content parts.", where)
    blocks = []
    for index, part in enumerate(content):
        part_where = f"{where}[{index}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            blocks.append({"type": "text", "text": part["text"]})
        elif kind == "image_url":
            blocks.append(_image_block(part, part_where))
        else:
            raise invalid(
                f"'{part_where}': Anthropic models accept text and image parts only.", part_where
            )
    return blocks


def _tool_use_block(call: object, where: str) -> dict[str, Any]:
    """An Anthropic tool_use block for one OpenAI `tool_calls[]` entry."""
    call_id, name, tool_input = tool_call(call, where)
    return {"type": "tool_use", "id": call_id, "name": name, "input": tool_input}


def _assistant_content(message: dict[str, Any], where: str) -> str | list[dict[str, Any]]:
    text = text_of(message.get("content"), f"{where}.content")
    calls = message.get("tool_calls") or []
    if not isinstance(calls, list):
        raise invalid(f"'{where}.tool_calls' must be an array.", f"{where}.tool_calls")
    if not calls:
        return text
    # Anthropic rejects empty text blocks, so text is only sent when there is some.
    blocks = [{"type": "text", "text": text}] if text else []
    for index, call in enumerate(calls):
        blocks.append(_tool_use_block(call, f"{where}.tool_calls[{index}]"))
    return blocks


def _tool_result_block(message: dict[str, Any], where: str) -> dict[str, Any]:
    call_id = message.get("tool_call_id")
    if not isinstance(call_id, str) or not call_id:
        raise invalid(f"'{where}.tool_call_id' is required.", f"{where}.tool_call_id")
    block: dict[str, Any] = {"type": "tool_result", "tool_use_id": call_id}
    text = text_of(message.get("content"), f"{where}.content")
    if text:
        block["content"] = text
    return block


def _conversation(messages: object) -> tuple[str, list[dict[str, Any]]]:
    """The system prompt and the Anthropic turns for OpenAI `messages`."""
    if not isinstance(messages, list):
        raise invalid("'messages' must be an array.", "messages")
    system: list[str] = []
    turns: list[dict[str, Any]] = []
    previous_role = None
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        role = message.get("role") if isinstance(message, dict) else None
        if role in ("system", "developer"):
            # Anthropic has one top-level system prompt; later ones are appended to it.
            text = text_of(message.get("content"), f"{where}.content")
            if text:
                system.append(text)
        elif role == "user":
            content = _user_content(message.get("content"), f"{where}.content")
            turns.append({"role": "user", "content": content})
        elif role == "assistant":
            content = _assistant_content(message, where)
            if content:  # Anthropic rejects an empty assistant turn.
                turns.append({"role": "assistant", "content": content})
        elif role == "tool":
            block = _tool_result_block(message, where)
            # Anthropic answers all of one turn's tool calls in a single user turn.
            if previous_role == "tool":
                turns[-1]["content"].append(block)
            else:
                turns.append({"role": "user", "content": [block]})
        else:
            raise invalid(
                f"'{where}.role' {role!r} is not supported by Anthropic models.", f"{where}.role"
            )
        previous_role = role
    return "\n\n".join(system), turns


def _tools(tools: object) -> list[dict[str, Any]]:
    if not isinstance(tools, list):
        raise invalid("'tools' must be an array.", "tools")
    converted = []
    for index, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if (
            not isinstance(tool, dict)
            or tool.get("type") != "function"
            or not isinstance(function, dict)
            or not isinstance(function.get("name"), str)
        ):
            raise invalid(
                f"'tools[{index}]' must be a function tool with a name.", f"tools[{index}]"
            )
        entry: dict[str, Any] = {
            "name": function["name"],
            "input_schema": function.get("parameters") or {"type": "object", "properties": {}},
        }
        if function.get("description"):
            entry["description"] = function["description"]
        converted.append(entry)
    return converted


def _tool_choice(choice: object, *, parallel: object) -> dict[str, Any] | None:
    """Anthropic's tool_choice for OpenAI's tool_choice and parallel_tool_calls."""
    converted: dict[str, Any] | None
    if choice is None:
        converted = None
    elif isinstance(choice, str) and choice in _TOOL_CHOICES:
        converted = {"type": _TOOL_CHOICES[choice]}
    elif (
        isinstance(choice, dict)
        and choice.get("type") == "function"
        and isinstance(choice.get("function"), dict)
        and isinstance(choice["function"].get("name"), str)
    ):
        converted = {"type": "tool", "name": choice["function"]["name"]}
    else:
        raise invalid(
            "'tool_choice' must be auto, required, none or a function to call.", "tool_choice"
        )
    if parallel is False:
        if converted is None:
            converted = {"type": "auto"}
        if converted["type"] != "none":
            converted["disable_parallel_tool_use"] = True
    return converted


def messages_body(payload: dict[str, Any], *, model: str, stream: bool) -> dict[str, Any]:
    """The Anthropic Messages body for an OpenAI chat payload; 400 naming a bad field."""
    n = payload.get("n")
    if n is not None and n != 1:
        raise invalid("Anthropic models return one choice per request: 'n' must be 1.", "n")
    system, turns = _conversation(payload.get("messages"))
    limit = max_tokens(payload)
    body: dict[str, Any] = {
        "model": model,
        "messages": turns,
        "max_tokens": DEFAULT_MAX_TOKENS if limit is None else limit,
    }
    if system:
        body["system"] = system
    for name in ("temperature", "top_p"):
        if payload.get(name) is not None:
            body[name] = payload[name]
    stops = stop_sequences(payload)
    if stops:
        body["stop_sequences"] = stops
    if payload.get("tools"):
        body["tools"] = _tools(payload["tools"])
        # Anthropic refuses tool_choice without tools, and OpenAI's default is auto anyway.
        choice = _tool_choice(
            payload.get("tool_choice"), parallel=payload.get("parallel_tool_calls")
        )
        if choice is not None:
            body["tool_choice"] = choice
    if isinstance(payload.get("user"), str):
        body["metadata"] = {"user_id": payload["user"]}
    if stream:
        body["stream"] = True
    return body


def usage_from_anthropic(data: object) -> TokenUsage | None:
    """Token counts from an Anthropic `usage` object (prompt includes cache), or None."""
    if not isinstance(data, dict) or not isinstance(data.get("input_tokens"), int):
        return None

    def count(name: str) -> int:
        value = data.get(name)
        return value if isinstance(value, int) and value > 0 else 0

    cached = count("cache_read_input_tokens")
    return TokenUsage(
        # Anthropic's input_tokens excludes cache reads and writes; ours counts the whole prompt.
        input_tokens=count("input_tokens") + count("cache_creation_input_tokens") + cached,
        cached_input_tokens=cached,
        output_tokens=count("output_tokens"),
    )


def finish_reason(stop_reason: object) -> str:
    """OpenAI's finish_reason for an Anthropic stop_reason (unknown ones read as stop)."""
    return _FINISH_REASONS.get(stop_reason, "stop") if isinstance(stop_reason, str) else "stop"


def _arguments(tool_input: object) -> str:
    return orjson.dumps(tool_input if tool_input is not None else {}).decode()


def chat_completion(message: object, *, created: int) -> tuple[bytes, TokenUsage]:
    """An OpenAI chat.completion body and its usage for an Anthropic Message."""
    if not isinstance(message, dict) or not isinstance(message.get("content"), list):
        raise UpstreamMalformed("The upstream provider sent a response that is not a message.")
    texts: list[str] = []
    tool_calls: list[dict[str, Any]] = []
    for block in message["content"]:
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text" and isinstance(block.get("text"), str):
            texts.append(block["text"])
        elif kind == "tool_use":
            tool_calls.append(
                {
                    "id": str(block.get("id", "")),
                    "type": "function",
                    "function": {
                        "name": str(block.get("name", "")),
                        "arguments": _arguments(block.get("input")),
                    },
                }
            )
        # Thinking and server-tool blocks have no OpenAI equivalent.
    reply: dict[str, Any] = {"role": "assistant", "content": "".join(texts) if texts else None}
    if tool_calls:
        reply["tool_calls"] = tool_calls
    usage = usage_from_anthropic(message.get("usage")) or TokenUsage(estimated=True)
    body = completion_object(
        completion_id=str(message.get("id", "")),
        created=created,
        model=str(message.get("model", "")),
        choices=[completion_choice(0, reply, finish_reason(message.get("stop_reason")))],
        usage=openai_usage(usage),
    )
    return orjson.dumps(body), usage


def _stream_error(data: dict[str, Any]) -> UpstreamError:
    """The UpstreamError for an Anthropic `error` event, classed by its error type."""
    error = data.get("error") if isinstance(data.get("error"), dict) else {}
    error_class = _STREAM_ERRORS.get(str(error.get("type")), UpstreamError)
    return mid_stream_error(error_class, error.get("message"))


class ChunkTranslator:
    """Turns one Anthropic Messages event stream into OpenAI chat.completion.chunk SSE."""

    def __init__(self, *, include_usage: bool) -> None:
        self._include_usage = include_usage
        self._created = int(time.time())
        self._id = ""
        self._model = ""
        self._usage_fields: dict[str, int] = {}
        self._final_usage: TokenUsage | None = None
        self._tool_indexes: dict[int, int] = {}  # Anthropic block index -> tool_calls index
        self._content_events = 0
        self.finished = False  # message_stop arrived: the stream is complete

    @property
    def usage(self) -> TokenUsage:
        """The provider's figures once message_delta came, else an estimate so far."""
        if self._final_usage is not None:
            return self._final_usage
        start = usage_from_anthropic(self._usage_fields) or TokenUsage()
        # Cut short: one delta is about one token, and message_start's count is a floor.
        return TokenUsage(
            input_tokens=start.input_tokens,
            cached_input_tokens=start.cached_input_tokens,
            output_tokens=max(self._content_events, start.output_tokens),
            estimated=True,
        )

    def _event(self, **fields: object) -> bytes:
        return chunk_event(chunk_id=self._id, created=self._created, model=self._model, **fields)

    def _chunk(self, delta: dict[str, Any], reason: str | None = None) -> bytes:
        return self._event(choices=[chunk_choice(0, delta, reason)])

    def _usage_chunk(self) -> bytes:
        return self._event(choices=[], usage=openai_usage(self.usage))

    def _merge_usage(self, usage: object) -> None:
        if isinstance(usage, dict):
            self._usage_fields.update(
                (name, value) for name, value in usage.items() if isinstance(value, int)
            )

    def _block_start(self, index: object, block: object) -> list[bytes]:
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text" and block.get("text"):
            return [self._chunk({"content": block["text"]})]
        if kind == "tool_use" and isinstance(index, int):
            tool_index = self._tool_indexes.setdefault(index, len(self._tool_indexes))
            call = {
                "index": tool_index,
                "id": str(block.get("id", "")),
                "type": "function",
                "function": {"name": str(block.get("name", "")), "arguments": ""},
            }
            return [self._chunk({"tool_calls": [call]})]
        return []  # thinking and server-tool blocks have no OpenAI equivalent

    def _block_delta(self, index: object, delta: object) -> list[bytes]:
        kind = delta.get("type") if isinstance(delta, dict) else None
        if kind == "text_delta" and delta.get("text"):
            self._content_events += 1
            return [self._chunk({"content": delta["text"]})]
        if kind == "input_json_delta" and delta.get("partial_json") and index in self._tool_indexes:
            self._content_events += 1
            fragment = {
                "index": self._tool_indexes[index],
                "function": {"arguments": delta["partial_json"]},
            }
            return [self._chunk({"tool_calls": [fragment]})]
        return []

    def translate(self, data: dict[str, Any]) -> list[bytes]:
        """The OpenAI SSE events for one Anthropic event; raises UpstreamError on `error`."""
        kind = data.get("type")
        if kind == "message_start":
            message = data.get("message") if isinstance(data.get("message"), dict) else {}
            self._id = str(message.get("id", ""))
            self._model = str(message.get("model", ""))
            self._merge_usage(message.get("usage"))
            return [self._chunk({"role": "assistant", "content": ""})]
        if kind == "content_block_start":
            return self._block_start(data.get("index"), data.get("content_block"))
        if kind == "content_block_delta":
            return self._block_delta(data.get("index"), data.get("delta"))
        if kind == "message_delta":
            self._merge_usage(data.get("usage"))
            self._final_usage = usage_from_anthropic(self._usage_fields)
            delta = data.get("delta") if isinstance(data.get("delta"), dict) else {}
            return [self._chunk({}, finish_reason(delta.get("stop_reason")))]
        if kind == "message_stop":
            self.finished = True
            tail = [self._usage_chunk()] if self._include_usage else []
            return [*tail, b"data: [DONE]\n\n"]
        if kind == "error":
            raise _stream_error(data)
        return []  # ping, content_block_stop, and event types added later

    def translate_batch(self, events: list[bytes]) -> bytes:
        """The OpenAI SSE bytes for a batch of raw Anthropic SSE events."""
        return translate_events(events, self.translate)
