"""The OpenAI chat format, read and written: pure helpers the translators share (no I/O).

Both Anthropic's and Gemini's translators read the same client payload (message
text, data URLs, tool-call arguments, stop lists, token limits) and write the
same OpenAI shapes back; the provider-specific parts stay in their modules.
"""

from typing import Any

import orjson

from billing.contracts import TokenUsage
from routing.errors import InvalidRequest


def invalid(message: str, param: str) -> InvalidRequest:
    """The 400 for a payload field the provider cannot take, naming the field."""
    return InvalidRequest(message, param=param)


def text_of(content: object, where: str) -> str:
    """The text of OpenAI message content: a string, or its text (or refusal) parts."""
    if content is None or isinstance(content, str):
        return content or ""
    if not isinstance(content, list):
        raise invalid(f"'{where}' must be a string or an array of content parts.", where)
    texts = []
    for index, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("text", "refusal") and isinstance(part.get(kind), str):
            texts.append(part[kind])
        else:
            raise invalid(f"'{where}[{index}]' must be a text part here.", f"{where}[{index}]")
    return "\n".join(texts)


def image_url(part: dict[str, Any]) -> object:
    """The URL of an `image_url` content part, given as an object or a bare string."""
    image = part.get("image_url")
    return image.get("url") if isinstance(image, dict) else image


def data_url(url: str, where: str, *, param: str) -> tuple[str, str]:
    """(media type, base64 data) of a `data:<type>;base64,...` URL; a 400 for anything else."""
    header, comma, data = url.removeprefix("data:").partition(",")
    media_type, _, encoding = header.partition(";")
    if not url.startswith("data:") or not comma or encoding != "base64" or not media_type:
        raise invalid(f"'{where}' must be a base64 data URL (data:<type>;base64,...).", param)
    return media_type, data


def tool_call(call: object, where: str) -> tuple[str, str, dict[str, Any]]:
    """(id, name, decoded arguments) of one OpenAI `tool_calls[]` entry; a 400 if malformed."""
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(call, dict) or not isinstance(function, dict):
        raise invalid(f"'{where}' must be a function tool call.", where)
    name, call_id = function.get("name"), call.get("id")
    if not isinstance(name, str) or not isinstance(call_id, str):
        raise invalid(f"'{where}' needs a string id and function.name.", where)
    arguments = function.get("arguments")
    if not isinstance(arguments, str):
        raise invalid(f"'{where}.function.arguments' must be a JSON string.", where)
    try:
        # A function without parameters may come back with empty arguments.
        decoded = orjson.loads(arguments) if arguments.strip() else {}
    except orjson.JSONDecodeError:
        raise invalid(f"'{where}.function.arguments' is not valid JSON.", where) from None
    if not isinstance(decoded, dict):
        raise invalid(f"'{where}.function.arguments' must encode a JSON object.", where)
    return call_id, name, decoded


def max_tokens(payload: dict[str, Any]) -> object:
    """The output token limit asked for (max_completion_tokens first), or None."""
    limit = payload.get("max_completion_tokens")
    return payload.get("max_tokens") if limit is None else limit


def stop_sequences(payload: dict[str, Any]) -> list[str] | None:
    """The `stop` field as a list (a lone string becomes one item), or None when absent."""
    stop = payload.get("stop")
    if stop is None:
        return None
    return [stop] if isinstance(stop, str) else list(stop)


def openai_usage(usage: TokenUsage) -> dict[str, Any]:
    """The OpenAI `usage` object for `usage`."""
    return {
        "prompt_tokens": usage.input_tokens,
        "completion_tokens": usage.output_tokens,
        "total_tokens": usage.input_tokens + usage.output_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_input_tokens},
    }


def completion_choice(index: int, message: dict[str, Any], reason: str) -> dict[str, Any]:
    """One `choices[]` entry of a chat.completion."""
    return {"index": index, "message": message, "finish_reason": reason, "logprobs": None}


def completion_object(
    *,
    completion_id: str,
    created: int,
    model: str,
    choices: list[dict[str, Any]],
    usage: dict[str, Any],
) -> dict[str, Any]:
    """A chat.completion object with the given choices and `usage` object."""
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": choices,
        "usage": usage,
    }


def chunk_choice(index: int, delta: dict[str, Any], reason: str | None = None) -> dict[str, Any]:
    """One `choices[]` entry of a chat.completion.chunk."""
    return {"index": index, "delta": delta, "logprobs": None, "finish_reason": reason}


def chunk_event(*, chunk_id: str, created: int, model: str, **fields: object) -> bytes:
    """One chat.completion.chunk as an SSE event; `fields` follow id, object, created, model."""
    chunk = {
        "id": chunk_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        **fields,
    }
    return b"data: " + orjson.dumps(chunk) + b"\n\n"
