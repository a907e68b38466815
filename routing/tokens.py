"""Local token estimates, for providers that report no usage.

About four characters per token is the usual rule of thumb for English with
BPE tokenizers; events built from an estimate are flagged `usage_estimated`.
"""

from collections.abc import Iterable
from typing import Any

_CHARS_PER_TOKEN = 4
# Role and framing tokens OpenAI counts per message.
_MESSAGE_OVERHEAD_TOKENS = 3


def estimate_text_tokens(text: str) -> int:
    """Tokens in `text`, rounded up; zero only for empty text."""
    return -(-len(text) // _CHARS_PER_TOKEN)


def _texts(content: object) -> Iterable[str]:
    if isinstance(content, str):
        yield content
    elif isinstance(content, list):
        for part in content:
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                yield part["text"]


def estimate_prompt_tokens(payload: dict[str, Any]) -> int:
    """Prompt tokens of an OpenAI chat payload (messages and tool definitions)."""
    total = 0
    for message in payload.get("messages") or []:
        if isinstance(message, dict):
            total += _MESSAGE_OVERHEAD_TOKENS
            total += sum(estimate_text_tokens(text) for text in _texts(message.get("content")))
    if payload.get("tools"):
        total += estimate_text_tokens(str(payload["tools"]))
    return total


def estimate_input_tokens(value: object) -> int:
    """Tokens of an embeddings `input`: strings, or token arrays counted exactly."""
    if isinstance(value, str):
        return estimate_text_tokens(value)
    if isinstance(value, list):
        if all(isinstance(item, int) for item in value):
            return len(value)
        return sum(estimate_input_tokens(item) for item in value)
    return 0


# Upper bounds, for reserving a request's cost before the provider counts it.
# Byte-level BPE tokenizers (OpenAI, Anthropic, Llama) and SentencePiece with
# byte fallback (Gemini) never make more tokens than the text has UTF-8 bytes;
# framing tokens and non-text parts (an image is at most ~1,600 tokens at any
# provider today) are added on top.
_CEILING_MESSAGE_TOKENS = 8
_CEILING_REQUEST_TOKENS = 16
_CEILING_PART_TOKENS = 2_000


def _bytes(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


def _content_ceiling(content: object) -> int:
    if isinstance(content, str):
        return _bytes(content)
    if not isinstance(content, list):
        return 0
    total = 0
    for part in content:
        text = part.get("text") if isinstance(part, dict) else None
        total += _bytes(text) if isinstance(text, str) else _CEILING_PART_TOKENS
    return total


def prompt_tokens_ceiling(payload: dict[str, Any]) -> int:
    """No provider counts more prompt tokens for this chat payload than this."""
    total = _CEILING_REQUEST_TOKENS
    for message in payload.get("messages") or []:
        if isinstance(message, dict):
            total += _CEILING_MESSAGE_TOKENS + _content_ceiling(message.get("content"))
            for name in ("tool_calls", "name", "function_call"):
                if message.get(name):
                    total += _bytes(str(message[name]))
    for name in ("tools", "functions", "response_format", "tool_choice"):
        if payload.get(name):
            total += _bytes(str(payload[name]))
    return total


def input_tokens_ceiling(value: object) -> int:
    """No provider counts more tokens for this embeddings `input` than this."""
    if isinstance(value, str):
        return _bytes(value) + 1
    if isinstance(value, list):
        if all(isinstance(item, int) for item in value):
            return len(value)
        return sum(input_tokens_ceiling(item) for item in value)
    return 0
