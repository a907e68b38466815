"""The response cache: exact-match answers for repeated requests, per organization.

Opt-in per route. A key covers the organization, the public model and the whole
request except how it is delivered (stream flags) and who asked (`user`), so
one org's answers never serve another's. Values are the OpenAI-format
completion plus its usage; a streamed request can be answered from them too.
"""

import contextlib
import hashlib
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Protocol

import orjson
from redis.asyncio import Redis
from redis.exceptions import RedisError

from billing.contracts import TokenUsage

# Request fields that change delivery or attribution, not the answer.
_NOT_PART_OF_THE_ANSWER = frozenset({"stream", "stream_options", "user"})
_IN_PROCESS_ENTRIES = 10_000


@dataclass(frozen=True, slots=True)
class CachedReply:
    body: bytes  # an OpenAI chat.completion
    usage: TokenUsage  # what the original call used
    deployment_name: str
    # Where the original answer came from, to price a hit when hits are billed.
    provider_kind: str
    upstream_model: str


def cache_key(*, org_id: int, model: str, payload: dict[str, Any]) -> str:
    """The cache key for this org's request (sorted JSON, so key order never matters)."""
    answer_fields = {k: v for k, v in payload.items() if k not in _NOT_PART_OF_THE_ANSWER}
    digest = hashlib.sha256(
        orjson.dumps({"org": org_id, "model": model, "request": answer_fields},
                     option=orjson.OPT_SORT_KEYS)
    ).hexdigest()  # fmt: skip
    return f"tollgate:cache:{org_id}:{digest}"


def _encode(reply: CachedReply) -> bytes:
    usage = reply.usage
    return orjson.dumps(
        {
            "body": reply.body.decode(),
            "deployment": reply.deployment_name,
            "priced_as": [reply.provider_kind, reply.upstream_model],
            "usage": [usage.input_tokens, usage.cached_input_tokens, usage.output_tokens,
                      usage.reasoning_tokens, usage.estimated],
        }
    )  # fmt: skip


def _decode(raw: bytes) -> CachedReply | None:
    try:
        data = orjson.loads(raw)
        input_tokens, cached, output, reasoning, estimated = data["usage"]
        provider_kind, upstream_model = data["priced_as"]
        return CachedReply(
            body=data["body"].encode(),
            usage=TokenUsage(input_tokens, cached, output, reasoning, estimated),
            deployment_name=data["deployment"],
            provider_kind=provider_kind,
            upstream_model=upstream_model,
        )
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return None  # an unreadable entry is a miss, never an error


class ResponseCache(Protocol):
    async def get(self, key: str) -> CachedReply | None: ...

    async def set(self, key: str, reply: CachedReply, ttl_s: int) -> None: ...


class InProcessCache:
    """The embedded default: a bounded LRU with expiry, in this process."""

    def __init__(self, max_entries: int = _IN_PROCESS_ENTRIES) -> None:
        self._entries: OrderedDict[str, tuple[float, bytes]] = OrderedDict()
        self._max_entries = max_entries

    async def get(self, key: str) -> CachedReply | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        expires_at, raw = entry
        if expires_at <= time.monotonic():
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return _decode(raw)

    async def set(self, key: str, reply: CachedReply, ttl_s: int) -> None:
        self._entries[key] = (time.monotonic() + ttl_s, _encode(reply))
        self._entries.move_to_end(key)
        while len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)


class RedisResponseCache:
    """Shared by every web process; Redis expires entries. Redis trouble is a miss."""

    def __init__(self, redis: Redis) -> None:
        self._redis = redis

    async def get(self, key: str) -> CachedReply | None:
        try:
            raw = await self._redis.get(key)
        except (RedisError, OSError):
            return None
        return _decode(raw) if raw else None

    async def set(self, key: str, reply: CachedReply, ttl_s: int) -> None:
        # The answer was served either way; a failed write only loses the cache entry.
        with contextlib.suppress(RedisError, OSError):
            await self._redis.set(key, _encode(reply), ex=ttl_s)


def stream_from_completion(body: bytes, *, include_usage: bool) -> bytes:
    """A complete OpenAI SSE stream that replays a cached chat.completion."""
    completion = orjson.loads(body)
    choice = (completion.get("choices") or [{}])[0]
    message = choice.get("message") or {}
    envelope = {
        "id": completion.get("id", ""),
        "object": "chat.completion.chunk",
        "created": completion.get("created", 0),
        "model": completion.get("model", ""),
    }

    def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
        choice_chunk = {"index": 0, "delta": delta, "finish_reason": finish_reason}
        return b"data: " + orjson.dumps({**envelope, "choices": [choice_chunk]}) + b"\n\n"

    events = [chunk({"role": "assistant", "content": ""})]
    if message.get("content"):
        events.append(chunk({"content": message["content"]}))
    for index, call in enumerate(message.get("tool_calls") or []):
        events.append(chunk({"tool_calls": [{**call, "index": index}]}))
    events.append(chunk({}, choice.get("finish_reason") or "stop"))
    if include_usage and completion.get("usage"):
        usage_chunk = {**envelope, "choices": [], "usage": completion["usage"]}
        events.append(b"data: " + orjson.dumps(usage_chunk) + b"\n\n")
    events.append(b"data: [DONE]\n\n")
    return b"".join(events)
