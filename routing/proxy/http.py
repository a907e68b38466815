"""ASGI plumbing for the proxy: the only module that touches raw ASGI messages."""

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from routing.errors import GatewayError, InvalidRequest, PayloadTooLarge, UpstreamRateLimited

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


def _too_large(max_bytes: int) -> PayloadTooLarge:
    # Built only when needed: an exception per request was a measurable cost.
    return PayloadTooLarge(f"Request body is larger than the limit of {max_bytes} bytes.")


class ClientGone(Exception):
    """The client disconnected before its request was read."""


@dataclass(slots=True)
class ProxyRequest:
    method: str
    path: str
    # Lower-case names; a repeated header keeps its last value.
    headers: dict[str, str]
    body: bytes
    client_host: str | None
    # Server-made: it is the usage event's id, so a client must not choose it.
    event_id: uuid.UUID
    started_at: datetime
    started_monotonic: float

    @property
    def request_id(self) -> str:
        return self.event_id.hex

    def elapsed_ms(self) -> int:
        return int((time.monotonic() - self.started_monotonic) * 1000)


@dataclass(slots=True)
class Response:
    status: int
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)
    content_type: str = "application/json"


@dataclass(slots=True)
class StreamingResponse:
    status: int
    first_chunk: bytes
    # Already started by the endpoint, so closing it always runs its cleanup.
    chunks: AsyncIterator[bytes]
    headers: dict[str, str] = field(default_factory=dict)
    content_type: str = "text/event-stream; charset=utf-8"


def error_response(
    exc: GatewayError, *, request_id: str | None = None, anthropic: bool = False
) -> Response:
    """The error's status and headers, with an OpenAI-shaped (or Anthropic-shaped) body."""
    headers = dict(exc.headers)
    if request_id:
        headers["x-request-id"] = request_id
    if isinstance(exc, UpstreamRateLimited) and "retry-after" not in headers:
        # Every 429 says when to retry: the provider's own wait if it gave one (its
        # absence still lets failover back off its own way), else a second.
        headers["retry-after"] = "1"
    body = exc.anthropic_body() if anthropic else exc.openai_body()
    return Response(status=exc.status, body=body, headers=headers)


def request_head(scope: Scope, *, max_bytes: int) -> ProxyRequest:
    """The request without its body; 413 if its declared length is over `max_bytes`."""
    headers = {
        name.decode("latin-1").lower(): value.decode("latin-1") for name, value in scope["headers"]
    }
    client = scope.get("client")
    request = ProxyRequest(
        method=scope["method"],
        path=scope["path"],
        headers=headers,
        body=b"",
        client_host=client[0] if client else None,
        event_id=uuid.uuid4(),
        started_at=datetime.now(UTC),
        started_monotonic=time.monotonic(),
    )
    declared = headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise InvalidRequest("Content-Length is not a number.")
        if int(declared) > max_bytes:
            raise _too_large(max_bytes)
    return request


async def read_body(receive: Receive, *, max_bytes: int) -> bytes:
    """The request body, refused (413) as soon as it grows over `max_bytes`."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > max_bytes:
            raise _too_large(max_bytes)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def read_request(scope: Scope, receive: Receive, *, max_bytes: int) -> ProxyRequest:
    """Read the request, refusing bodies over `max_bytes` before buffering them."""
    request = request_head(scope, max_bytes=max_bytes)
    request.body = await read_body(receive, max_bytes=max_bytes)
    return request


def _raw_headers(content_type: str, headers: dict[str, str]) -> list[tuple[bytes, bytes]]:
    raw = [(b"content-type", content_type.encode("latin-1"))]
    raw.extend((name.encode("latin-1"), value.encode("latin-1")) for name, value in headers.items())
    return raw


async def send_response(send: Send, response: Response) -> None:
    """Send a complete response."""
    headers = _raw_headers(response.content_type, response.headers)
    headers.append((b"content-length", str(len(response.body)).encode()))
    await send({"type": "http.response.start", "status": response.status, "headers": headers})
    await send({"type": "http.response.body", "body": response.body})


async def send_stream(send: Send, receive: Receive, response: StreamingResponse) -> None:
    """Send chunks as they come; a client disconnect cancels the producer.

    The producer is closed in every case, so its `finally` (usage recording,
    closing the upstream) always runs.
    """
    headers = _raw_headers(response.content_type, response.headers)
    headers.append((b"cache-control", b"no-cache"))
    headers.append((b"x-accel-buffering", b"no"))
    streaming_task = asyncio.current_task()
    assert streaming_task is not None
    finished = disconnected = False

    async def watch_for_disconnect() -> None:
        nonlocal disconnected
        while (await receive())["type"] != "http.disconnect":
            pass
        # After the last chunk the server reports "disconnect" too: not a cancel.
        if not finished:
            disconnected = True
            streaming_task.cancel()

    watcher = asyncio.create_task(watch_for_disconnect())
    try:
        async with contextlib.aclosing(response.chunks) as chunks:
            await send(
                {"type": "http.response.start", "status": response.status, "headers": headers}
            )
            await send(
                {"type": "http.response.body", "body": response.first_chunk, "more_body": True}
            )
            async for chunk in chunks:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        finished = True
        await send({"type": "http.response.body", "body": b""})
    except asyncio.CancelledError:
        if not disconnected:
            raise
        streaming_task.uncancel()
    finally:
        watcher.cancel()
