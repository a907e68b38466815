"""Deterministic completion text, token counts and embedding vectors."""

from __future__ import annotations

import base64
import hashlib
import json
import math
import struct
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

# 64 words, so each hash byte picks one without bias (256 is a multiple of 64).
WORDS: Final = (
    "alpha", "amber", "anchor", "apple", "arrow", "atlas", "autumn", "banner",
    "basket", "beacon", "birch", "bison", "blossom", "bramble", "breeze", "bridge",
    "canyon", "cedar", "cinder", "clover", "comet", "copper", "coral", "cradle",
    "crystal", "delta", "ember", "falcon", "feather", "fern", "garden", "glacier",
    "harbor", "hazel", "horizon", "island", "ivory", "juniper", "lantern", "lilac",
    "maple", "meadow", "meteor", "mosaic", "nectar", "orbit", "orchard", "pebble",
    "prairie", "quartz", "raven", "ripple", "saffron", "sierra", "summit", "thistle",
    "timber", "tundra", "valley", "velvet", "willow", "winter", "zenith", "zephyr",
)  # fmt: skip
# Each message costs this many prompt tokens on top of its words (role and framing).
MESSAGE_OVERHEAD_TOKENS: Final = 3


def _stream_bytes(seed: bytes, count: int) -> bytes:
    """Return `count` pseudo-random bytes that depend only on `seed`."""
    out = bytearray()
    block = 0
    while len(out) < count:
        out += hashlib.sha256(seed + block.to_bytes(4, "big")).digest()
        block += 1
    return bytes(out[:count])


def completion_words(model: str, prompt: str, count: int) -> list[str]:
    """Return `count` words that depend only on the base model name and prompt."""
    if count <= 0:
        return []
    seed = hashlib.sha256(model.encode() + b"\x00" + prompt.encode()).digest()
    size = len(WORDS)
    return [WORDS[byte % size] for byte in _stream_bytes(seed, count)]


@dataclass(frozen=True, slots=True)
class Completion:
    """One request's answer: its words, whether a cap cut it, and the prompt size."""

    words: list[str]
    capped: bool
    prompt_tokens: int

    @property
    def text(self) -> str:
        """Return the completion text: the words joined by single spaces."""
        return " ".join(self.words)

    def deltas(self) -> list[str]:
        """Return one stream delta per word; their concatenation equals `text`."""
        return [word if index == 0 else " " + word for index, word in enumerate(self.words)]


def plan_completion(
    *,
    model: str,
    messages: Sequence[dict[str, Any]],
    system: object,
    tokens: int,
    max_tokens: int | None,
) -> Completion:
    """Return the deterministic completion, capped at `max_tokens` words."""
    count = tokens if max_tokens is None else min(tokens, max_tokens)
    return Completion(
        words=completion_words(model, last_user_text(messages), count),
        capped=count < tokens,
        prompt_tokens=prompt_tokens(messages, system),
    )


def text_of(content: object) -> str:
    """Return the text of message content: a string, or its parts' `text`."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(
            part["text"]
            for part in content
            if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    return ""


def count_words(text: str) -> int:
    """Return the number of whitespace-separated words in `text`."""
    return len(text.split())


def prompt_tokens(messages: Sequence[dict[str, Any]], system: object = None) -> int:
    """Return the prompt tokens: words of all text (system too) plus 3 per message."""
    total = count_words(text_of(system))
    for message in messages:
        total += count_words(text_of(message.get("content"))) + MESSAGE_OVERHEAD_TOKENS
    return total


def last_user_text(messages: Sequence[dict[str, Any]]) -> str:
    """Return the text of the last `user` message ('' if there is none)."""
    for message in reversed(messages):
        if message.get("role") == "user":
            return text_of(message.get("content"))
    return ""


def embedding_vector(item: str | list[int], dimensions: int) -> list[float]:
    """Return a unit-length vector of float32-exact values derived from `item`."""
    key = item.encode() if isinstance(item, str) else ",".join(map(str, item)).encode()
    seed = hashlib.sha256(key).digest()
    raw = struct.unpack(f"<{dimensions}H", _stream_bytes(seed, 2 * dimensions))
    values = [value / 32767.5 - 1.0 for value in raw]
    norm = math.sqrt(sum(value * value for value in values)) or 1.0
    # Rounding through float32 makes the float and base64 encodings decode equal.
    return array("f", [value / norm for value in values]).tolist()


def embedding_base64(vector: list[float]) -> str:
    """Return `vector` as base64 of little-endian float32, as the OpenAI API does."""
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()


@dataclass(frozen=True, slots=True)
class ToolCall:
    """The mock's deterministic tool call, shared by every API family it speaks."""

    call_id: str
    name: str
    arguments: dict[str, Any]

    def arguments_json(self) -> str:
        """The arguments as compact JSON (OpenAI sends them as a string)."""
        return json.dumps(self.arguments, separators=(",", ":"), sort_keys=True)

    @property
    def completion_tokens(self) -> int:
        """What the call costs as output: its name, its words, plus framing."""
        return 1 + count_words(self.arguments["query"]) + MESSAGE_OVERHEAD_TOKENS


def plan_tool_call(
    *, tool_names: Sequence[str], forced: str | None, answering_tool_result: bool, prompt: str
) -> ToolCall | None:
    """The tool call the mock makes, or None when it answers with text.

    It calls a tool when the request offers tools and the conversation is not
    already answering a tool result: the forced tool if there is one, else the
    first offered, with arguments {"query": <last user text>}.
    """
    if not tool_names or answering_tool_result:
        return None
    name = forced if forced in tool_names else tool_names[0]
    digest = hashlib.sha256(f"{name}\x00{prompt}".encode()).hexdigest()
    return ToolCall(call_id=f"call_{digest[:24]}", name=name, arguments={"query": prompt})
