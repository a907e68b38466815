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
