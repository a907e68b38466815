"""Sending answers: JSON bodies, server-sent event streams, and the injected faults."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final

import orjson
from aiohttp import web

from .errors import Family, MockError
from .options import MockOptions

MALFORMED_BODY: Final = b'{"id": "mock-malformed", "choices": [{"this is": not json'
_MALFORMED_EVENTS: Final = MappingProxyType(
    {
        Family.OPENAI: b"data: {this is not json\n\n",
        Family.ANTHROPIC: b"event: content_block_delta\ndata: {this is not json\n\n",
    }
)
_SSE_HEADERS: Final = MappingProxyType(
    {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"}
)
# How often a hanging handler checks whether its client has gone away.
_HANG_POLL_S: Final = 0.25
# Time for the client to read the partial stream before the reset discards unread bytes.
_RESET_GRACE_S: Final = 0.05
# Streamed tool arguments arrive in pieces this long, as providers send them.
_FRAGMENT_CHARS: Final = 16


def json_response(payload: object) -> web.Response:
    """Return a 200 application/json response with `payload` serialized by orjson."""
    return web.Response(body=orjson.dumps(payload), content_type="application/json")


def sse_data(payload: object) -> bytes:
    """Return one `data:` server-sent event (the OpenAI streaming framing)."""
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def sse_event(name: str, payload: object) -> bytes:
    """Return one named server-sent event (the Anthropic streaming framing)."""
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(payload) + b"\n\n"


def text_fragments(text: str) -> list[str]:
    """Return pieces of `text` that join to it: two or more once it has two characters."""
    size = max(1, min(_FRAGMENT_CHARS, len(text) // 2))
    return [text[start : start + size] for start in range(0, len(text), size)] or [text]


@dataclass(frozen=True, slots=True)
class StreamPlan:
    """A stream's encoded events: opening ones, one per word, closing ones."""

    head: Sequence[bytes]
    words: Sequence[bytes]
    tail: Sequence[bytes]


async def sleep_ms(delay_ms: int) -> None:
    """Wait `delay_ms` milliseconds (without yielding at all when it is zero)."""
    if delay_ms > 0:
        await asyncio.sleep(delay_ms / 1000)


def reset_connection(request: web.BaseRequest) -> None:
    """Abort the TCP connection so the client sees a reset, not a clean close."""
    transport = request.transport
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        # Linger 0 turns the close into an RST, as a crashed upstream would send.
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


async def _hang(request: web.BaseRequest) -> None:
    """Return once the client has gone (the handler may instead be cancelled)."""
    # aiohttp exposes no disconnect event to await, so poll the transport.
    while (transport := request.transport) is not None and not transport.is_closing():  # noqa: ASYNC110
        await asyncio.sleep(_HANG_POLL_S)


def fault_error(options: MockOptions) -> MockError:
    """Return the error for a status fault, with Retry-After on 429 unless disabled."""
    status = options.fault
    assert isinstance(status, int)
    headers = None
    if status == 429 and options.retry_after is not None:
        headers = {"Retry-After": str(options.retry_after)}
    return MockError(status, f"mock fault: injected HTTP {status}", headers=headers)


async def answer_with_fault(request: web.BaseRequest, options: MockOptions) -> web.StreamResponse:
    """Answer a non-streamed request with `options.fault` after `latency_ms`.

    Raises MockError for a status fault; for hang and reset the returned response is
    never delivered (aiohttp quietly drops a write to a closed connection).
    """
    if options.fault == "hang":
        await _hang(request)
        return web.Response()
    await sleep_ms(options.latency_ms)
    if options.fault == "reset":
        reset_connection(request)
        return web.Response()
    if options.fault == "malformed" or options.fault == "truncated":
        return web.Response(body=MALFORMED_BODY, content_type="application/json")
    raise fault_error(options)


async def _until_flushed(request: web.BaseRequest) -> None:
    """Return once the transport has handed every written byte to the kernel."""
    transport = request.transport
    # asyncio transports signal only crossing the high-water mark, not emptiness: poll.
    while transport is not None and transport.get_write_buffer_size() > 0:  # noqa: ASYNC110
        await asyncio.sleep(0.005)
    await asyncio.sleep(_RESET_GRACE_S)


async def send_stream(
    request: web.BaseRequest, options: MockOptions, family: Family, plan: StreamPlan
) -> web.StreamResponse:
    """Stream `plan` as server-sent events with the configured delays and stream faults.

    Headers go out at once; the first event after `ttft_ms`; each later word and the
    closing events `chunk_delay_ms` apart (one write when that is zero, to stay cheap);
    the body's end `end_delay_ms` after the last event.
    """
    fault = options.fault
    if fault is not None and fault not in ("reset", "malformed", "truncated"):
        return await answer_with_fault(request, options)
    response = web.StreamResponse(headers=_SSE_HEADERS)
    try:
        await response.prepare(request)
        await sleep_ms(options.ttft_ms)
        if fault == "reset":
            await response.write(b"".join([*plan.head, *plan.words[: len(plan.words) // 2]]))
            await _until_flushed(request)
            reset_connection(request)
            return response
        if fault == "malformed":
            await response.write(plan.head[0] + _MALFORMED_EVENTS[family])
        elif fault == "truncated":  # a clean end halfway: no finish, usage or [DONE]
            await response.write(b"".join([*plan.head, *plan.words[: len(plan.words) // 2]]))
        elif options.chunk_delay_ms == 0:
            await response.write(b"".join([*plan.head, *plan.words, *plan.tail]))
        else:
            await response.write(b"".join([*plan.head, *plan.words[:1]]))
            for event in [*plan.words[1:], b"".join(plan.tail)]:
                await sleep_ms(options.chunk_delay_ms)
                await response.write(event)
        await sleep_ms(options.end_delay_ms)
        await response.write_eof()
    except ConnectionError:
        pass  # The client went away mid-stream; there is no one left to answer.
    return response
