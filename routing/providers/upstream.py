"""Shared upstream HTTP plumbing for adapters: posting, timeouts, error mapping, SSE relay."""

import abc
import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, Protocol

import aiohttp
import orjson
from django.conf import settings

from billing.contracts import TokenUsage
from routing.contracts import DeploymentSpec
from routing.errors import (
    GatewayError,
    UpstreamAddressForbidden,
    UpstreamError,
    UpstreamMalformed,
    UpstreamRateLimited,
    UpstreamRejected,
    UpstreamResponseTooLarge,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from routing.providers.base import ProviderAdapter, UpstreamStream
from routing.providers.egress import (
    AddressForbidden,
    GuardedResolver,
    egress_policy,
    guarded_socket_factory,
)
from routing.proxy.tracing import current_trace

# Error bodies are read for a message only; anything longer is cut.
_ERROR_BODY_LIMIT = 64 * 1024
_MESSAGE_LIMIT = 500
_RETRY_AFTER_LIMIT_S = 3600


def upstream_session() -> aiohttp.ClientSession:
    """The process's one pooled session for provider calls.

    Every new connection is judged by the operator's egress policy on the address it
    actually goes to (routing/providers/egress.py); a pooled one is not judged again.
    Proxies from the environment (HTTP_PROXY...) are never used: a proxy would resolve
    and connect on our behalf, out of the policy's sight. Cookies a provider sets are
    dropped: the session is every tenant's, so a kept cookie would ride along on other
    tenants' calls.
    """
    policy = egress_policy()
    connector = aiohttp.TCPConnector(
        limit=settings.TOLLGATE_UPSTREAM_MAX_CONNECTIONS,
        limit_per_host=0,
        ttl_dns_cache=300,  # only permitted addresses are cached
        keepalive_timeout=60,
        resolver=GuardedResolver(policy),
        socket_factory=guarded_socket_factory(policy),
    )
    return aiohttp.ClientSession(
        connector=connector, trust_env=False, cookie_jar=aiohttp.DummyCookieJar()
    )


def _address_forbidden() -> UpstreamAddressForbidden:
    # Which address stays unsaid: it would map our network for the tenant.
    return UpstreamAddressForbidden(
        "The upstream provider's address is on a network the gateway may not connect to; "
        "ask the gateway's operator to allow it."
    )


@contextlib.contextmanager
def client_errors_mapped() -> Iterator[None]:
    """Turn aiohttp and timeout exceptions into UpstreamError with a safe message."""
    try:
        yield
    except TimeoutError:
        raise UpstreamTimeout("The upstream provider did not answer in time.") from None
    except aiohttp.ClientConnectorError as exc:
        if isinstance(exc.os_error, AddressForbidden):
            raise _address_forbidden() from None
        raise UpstreamUnreachable("The upstream provider could not be reached.") from None
    except aiohttp.InvalidURL:
        # aiohttp refuses legacy numeric IPv4 hosts (http://2130706433/ is 127.0.0.1)
        # rather than let them slip past an address check: refused like one.
        raise _address_forbidden() from None
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
    if status < 300:
        return
    if status < 400:
        # Never followed: the provider could send the gateway anywhere (our network).
        raise UpstreamError(
            f"The upstream provider answered with a redirect (HTTP {status}), "
            "which the gateway does not follow.",
            code="upstream_redirect",
        )
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


def reply_timeout(deployment: DeploymentSpec) -> aiohttp.ClientTimeout:
    """The timeout of a non-streamed call: connect, then one deadline for the whole answer."""
    # A non-streamed answer is silent until it is done: only the total
    # deadline applies, not the gap-between-chunks read timeout.
    return aiohttp.ClientTimeout(
        total=deployment.total_timeout_s, sock_connect=deployment.connect_timeout_s
    )


def stream_timeout(deployment: DeploymentSpec) -> aiohttp.ClientTimeout:
    """The timeout of a streamed call: connect, the whole stream, and each gap between reads."""
    return aiohttp.ClientTimeout(
        total=deployment.total_timeout_s,
        sock_connect=deployment.connect_timeout_s,
        sock_read=deployment.read_timeout_s,
    )


def _seconds_until(deadline: float) -> float:
    return max(deadline - time.monotonic(), 0.001)


async def post_json(
    session: aiohttp.ClientSession,
    url: str,
    body: dict[str, Any],
    *,
    headers: dict[str, str],
    client_timeout: aiohttp.ClientTimeout,
    accepted_by: float | None = None,
) -> aiohttp.ClientResponse:
    """The 2xx response to a JSON POST, by `accepted_by` if set; else UpstreamError, released."""
    with client_errors_mapped():
        if accepted_by is None:  # the client timeout alone applies: no second timer
            return await _accepted(session, url, body, headers, client_timeout)
        async with asyncio.timeout(_seconds_until(accepted_by)):
            return await _accepted(session, url, body, headers, client_timeout)


async def _accepted(
    session: aiohttp.ClientSession, url: str, body: dict[str, Any], headers: dict[str, str],
    client_timeout: aiohttp.ClientTimeout,
) -> aiohttp.ClientResponse:  # fmt: skip
    response = await session.post(
        url, data=orjson.dumps(body), headers=headers, timeout=client_timeout,
        allow_redirects=False,
    )  # fmt: skip
    try:
        await raise_for_upstream_status(response)
    except BaseException:
        response.release()
        raise
    return response


def _too_large(limit: int) -> UpstreamResponseTooLarge:
    return UpstreamResponseTooLarge(
        f"The upstream provider's answer is larger than the gateway accepts ({limit:,} bytes)."
    )


async def read_body(response: aiohttp.ClientResponse) -> bytes:
    """The whole body of a non-streamed reply, at most TOLLGATE_MAX_UPSTREAM_RESPONSE_BYTES
    (checked while reading); the response is released however it ends."""
    limit = settings.TOLLGATE_MAX_UPSTREAM_RESPONSE_BYTES
    try:
        with client_errors_mapped():
            declared = response.content_length
            if declared is not None:  # aiohttp reads no more than it declares
                if declared > limit:
                    raise _too_large(limit)
                return await response.read()
            chunks, size = [], 0
            async for chunk in response.content.iter_any():
                size += len(chunk)
                if size > limit:
                    raise _too_large(limit)
                chunks.append(chunk)
            return b"".join(chunks)
    finally:
        response.release()


def json_object(raw: bytes) -> dict[str, Any]:
    """`raw` parsed as a JSON object; UpstreamMalformed if it is not one."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        data = None
    if not isinstance(data, dict):
        raise UpstreamMalformed("The upstream provider sent a response that is not JSON.")
    return data


async def read_json(response: aiohttp.ClientResponse) -> dict[str, Any]:
    """The JSON object a non-streamed reply carries (else UpstreamMalformed); always released."""
    return json_object(await read_body(response))


class HTTPAdapter(ProviderAdapter):
    """An adapter whose provider takes JSON POSTs: subclasses say where, and how to sign."""

    @abc.abstractmethod
    def _url(self, deployment: DeploymentSpec, target: str) -> str:
        """The URL of `target` (a path or method, as the provider names them) for `deployment`."""

    @abc.abstractmethod
    def _credentials(self, api_key: str) -> dict[str, str]:
        """The header that carries `api_key`, the way this provider expects it."""

    def _headers(self, deployment: DeploymentSpec, request_id: str) -> dict[str, str]:
        """JSON content, the request id, and the credentials header when there is a key."""
        headers = {"content-type": "application/json", "x-request-id": request_id}
        if deployment.api_key:
            headers.update(self._credentials(deployment.api_key))
        return headers

    async def _send(
        self,
        deployment: DeploymentSpec,
        target: str,
        body: dict[str, Any],
        *,
        request_id: str,
        client_timeout: aiohttp.ClientTimeout,
        accepted_by: float | None = None,
    ) -> aiohttp.ClientResponse:
        """The provider's 2xx response to `body`; raises UpstreamError, the response released."""
        headers = self._headers(deployment, request_id)
        if (trace := current_trace()) is not None:  # only while tracing is on
            trace.inject_upstream(headers, request_id=request_id)
        try:
            return await post_json(
                self.session,
                self._url(deployment, target),
                body,
                headers=headers,
                client_timeout=client_timeout,
                accepted_by=accepted_by,
            )
        except UpstreamRejected as rejected:
            raise self._rejection(rejected) from None

    def _rejection(self, rejected: UpstreamRejected) -> UpstreamError:
        """What the provider's refusal of a request (4xx) means for the client: by default, that."""
        return rejected

    async def _post(
        self, deployment: DeploymentSpec, target: str, body: dict[str, Any], *, request_id: str
    ) -> aiohttp.ClientResponse:
        """The 2xx response of a non-streamed call, its body still to be read."""
        return await self._send(
            deployment,
            target,
            body,
            request_id=request_id,
            client_timeout=reply_timeout(deployment),
        )

    async def _post_for_json(
        self, deployment: DeploymentSpec, target: str, body: dict[str, Any], *, request_id: str
    ) -> dict[str, Any]:
        """The JSON object a non-streamed call answers with; raises UpstreamError otherwise."""
        return await read_json(await self._post(deployment, target, body, request_id=request_id))

    async def _open_stream(
        self, deployment: DeploymentSpec, target: str, body: dict[str, Any], *, request_id: str
    ) -> tuple[aiohttp.ClientResponse, float]:
        """A stream's 2xx response, accepted within TTFT, and the time its first event is due."""
        first_event_deadline = time.monotonic() + deployment.ttft_timeout_s
        response = await self._send(
            deployment,
            target,
            body,
            request_id=request_id,
            client_timeout=stream_timeout(deployment),
            accepted_by=first_event_deadline,
        )
        return response, first_event_deadline


def mid_stream_error(error_class: type[UpstreamError], message: object) -> UpstreamError:
    """An `error_class` for a failure reported inside a stream, quoting its message if any."""
    if isinstance(message, str) and message:
        return error_class(f"The upstream provider failed mid-stream: {message[:_MESSAGE_LIMIT]}")
    return error_class("The upstream provider failed mid-stream.")


async def sse_event_batches(
    content: aiohttp.StreamReader, *, max_event_bytes: int
) -> AsyncIterator[list[bytes]]:
    """Complete SSE events (without their blank-line terminator), batched per read.

    Events that arrive in one network read come out together, so a fast
    upstream costs one client write per read rather than per event. An event
    still incomplete past `max_event_bytes` is refused, not buffered on.
    """
    buffer = b""
    async for data in content.iter_any():
        buffer += data
        if b"\r" in buffer:
            buffer = buffer.replace(b"\r\n", b"\n")
        if b"\n\n" not in buffer:
            if len(buffer) > max_event_bytes:
                raise _too_large(max_event_bytes)
            continue
        *events, buffer = buffer.split(b"\n\n")
        if len(buffer) > max_event_bytes:
            raise _too_large(max_event_bytes)
        yield [event for event in events if event]
    if buffer.strip():
        yield [buffer.strip()]


def sse_json(event: bytes) -> dict[str, Any] | None:
    """The JSON object of one SSE event's data lines, or None for an event without data."""
    # An `event:` line is ignored: every provider's data carries its own type.
    lines = [
        line.removeprefix(b"data:").removeprefix(b" ")
        for line in event.split(b"\n")
        if line.startswith(b"data:")
    ]
    if not lines:
        return None
    return sse_data_json(b"\n".join(lines))


def sse_data_json(data: bytes) -> dict[str, Any]:
    """The JSON object an SSE event's data holds; UpstreamMalformed if it is not one."""
    try:
        parsed = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise UpstreamMalformed("The upstream provider sent a malformed stream event.") from None
    if not isinstance(parsed, dict):
        raise UpstreamMalformed("The upstream provider sent a malformed stream event.")
    return parsed


def translate_events(
    events: list[bytes], translate: Callable[[dict[str, Any]], list[bytes]]
) -> bytes:
    """The client's SSE bytes for a batch of upstream events, each translated from its JSON."""
    out: list[bytes] = []
    for event in events:
        data = sse_json(event)
        if data is not None:
            out.extend(translate(data))
    return b"".join(out)


class SSEStream(UpstreamStream):
    """An upstream SSE response relayed batch by batch, its first output due by a deadline."""

    def __init__(self, response: aiohttp.ClientResponse, *, first_event_deadline: float) -> None:
        self._response = response
        self._first_event_deadline = first_event_deadline
        self._complete = False

    @abc.abstractmethod
    def _translate(self, events: list[bytes]) -> bytes:
        """The client's SSE bytes for one batch of upstream events (b"" when none are due)."""

    def _closing(self) -> bytes:
        """The bytes that end the client's stream; raises UpstreamMalformed if it ended early."""
        return b""

    def _translate_each(self, batch: list[bytes]) -> tuple[bytes, GatewayError | None]:
        """A batch translated event by event, stopping at the first failing event.

        What came before the failure in the same network read still reaches the
        client: the caller yields it, then raises the failure.
        """
        translated = []
        for event in batch:
            try:
                translated.append(self._translate([event]))
            except GatewayError as failure:
                return b"".join(translated), failure
        return b"".join(translated), None

    async def events(self) -> AsyncIterator[bytes]:
        """Translated batches as they arrive; the first must come by the first-event deadline."""
        batches = sse_event_batches(
            self._response.content, max_event_bytes=settings.TOLLGATE_MAX_UPSTREAM_RESPONSE_BYTES
        )
        with client_errors_mapped():
            first, failure = b"", None
            async with asyncio.timeout(_seconds_until(self._first_event_deadline)):
                # Translated before anything is yielded, so e.g. a blocked prompt is still a 400.
                while not first and failure is None:
                    batch = await anext(batches, None)
                    if batch is None:
                        raise UpstreamMalformed(
                            "The upstream provider closed the stream without data."
                        )
                    first, failure = self._translate_each(batch)
            if first:
                yield first
            if failure is not None:
                raise failure
            async for batch in batches:
                translated, failure = self._translate_each(batch)
                if translated:
                    yield translated
                if failure is not None:
                    raise failure
        closing = self._closing()
        self._complete = True  # the upstream body was read to its end
        if closing:
            yield closing

    async def aclose(self) -> None:
        """Release the connection to the pool if the stream was read through, else drop it."""
        if self._complete:
            self._response.release()  # back to the pool
        else:
            self._response.close()  # cut short: the connection cannot be reused


class ChunkTranslating(Protocol):
    """What a provider's stream translator offers: OpenAI chunks, a usage count, an end."""

    @property
    def usage(self) -> TokenUsage: ...

    @property
    def finished(self) -> bool: ...

    def translate_batch(self, events: list[bytes]) -> bytes: ...


class TranslatedStream(SSEStream):
    """A provider's own SSE stream, relayed as OpenAI chunks through its translator."""

    def __init__(
        self,
        response: aiohttp.ClientResponse,
        *,
        translator: ChunkTranslating,
        first_event_deadline: float,
    ) -> None:
        super().__init__(response, first_event_deadline=first_event_deadline)
        self._translator = translator

    @property
    def usage(self) -> TokenUsage:
        """The translator's count: the provider's figures once sent, else an estimate so far."""
        return self._translator.usage

    def _translate(self, events: list[bytes]) -> bytes:
        """The OpenAI chunks for a batch of the provider's events."""
        return self._translator.translate_batch(events)

    def _closing(self) -> bytes:
        """Nothing more to send; raises UpstreamMalformed if the provider never finished."""
        if not self._translator.finished:
            # Without its end the client would never get a finish chunk or [DONE].
            raise UpstreamMalformed("The upstream provider ended the stream before finishing.")
        return b""
