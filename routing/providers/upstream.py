"""Shared upstream HTTP helpers: error mapping and SSE framing for adapters."""

import contextlib
from collections.abc import AsyncIterator, Iterator

import aiohttp
import orjson

from routing.errors import (
    UpstreamError,
    UpstreamRateLimited,
    UpstreamRejected,
    UpstreamTimeout,
    UpstreamUnreachable,
)

# Error bodies are read for a message only; anything longer is cut.
_ERROR_BODY_LIMIT = 64 * 1024
_MESSAGE_LIMIT = 500
_RETRY_AFTER_LIMIT_S = 3600


@contextlib.contextmanager
def client_errors_mapped() -> Iterator[None]:
    """Turn aiohttp and timeout exceptions into UpstreamError with a safe message."""
    try:
        yield
    except TimeoutError:
        raise UpstreamTimeout("The upstream provider did not answer in time.") from None
    except aiohttp.ClientConnectorError:
        raise UpstreamUnreachable("The upstream provider could not be reached.") from None
    except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError, aiohttp.ClientOSError):
        raise UpstreamUnreachable("The connection to the upstream provider was lost.") from None
    except aiohttp.ClientError:
        raise UpstreamError("The upstream provider request failed.") from None


def _upstream_message(body: bytes) -> str:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return ""
    error = data.get("error") if isinstance(data, dict) else None
    message = error.get("message") if isinstance(error, dict) else None
    return message[:_MESSAGE_LIMIT] if isinstance(message, str) else ""


def _retry_after(value: str | None) -> dict[str, str]:
    if value and value.strip().isdigit() and int(value) <= _RETRY_AFTER_LIMIT_S:
        return {"retry-after": value.strip()}
    return {}


async def raise_for_upstream_status(response: aiohttp.ClientResponse) -> None:
    """Raise the UpstreamError that tells the client what happened, if status is not 2xx."""
    status = response.status
    if status < 400:
        return
    with client_errors_mapped():
        body = await response.content.read(_ERROR_BODY_LIMIT)
    message = _upstream_message(body)
    if status == 429:
        raise UpstreamRateLimited(
            "The upstream provider is rate limiting requests; retry later.",
            headers=_retry_after(response.headers.get("retry-after")),
        )
    if status in (400, 413, 422):
        rejected = UpstreamRejected(
            f"The provider rejected the request: {message}"
            if message
            else f"The provider rejected the request (HTTP {status})."
        )
        rejected.status = status
        raise rejected
    if status in (401, 403):
        raise UpstreamError("The upstream provider refused the gateway's credentials.")
    if status == 404:
        raise UpstreamError("The upstream provider does not serve the configured model.")
    raise UpstreamError(f"The upstream provider failed (HTTP {status}).")


async def sse_event_batches(
    content: aiohttp.StreamReader,
) -> AsyncIterator[list[bytes]]:
    """Complete SSE events (without their blank-line terminator), batched per read.

    Events that arrive in one network read come out together, so a fast
    upstream costs one client write per read rather than per event.
    """
    buffer = b""
    async for data in content.iter_any():
        buffer += data
        if b"\r" in buffer:
            buffer = buffer.replace(b"\r\n", b"\n")
        if b"\n\n" not in buffer:
            continue
        *events, buffer = buffer.split(b"\n\n")
        yield [event for event in events if event]
    if buffer.strip():
        yield [buffer.strip()]
