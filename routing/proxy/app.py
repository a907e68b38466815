"""The lean ASGI application serving /v1/: no Django request handler, no middleware."""

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from django.conf import settings

from routing.errors import GatewayError, MethodNotAllowed, NotFound
from routing.proxy import endpoints, observe
from routing.proxy.http import (
    ClientGone,
    ProxyRequest,
    Receive,
    Response,
    Scope,
    Send,
    StreamingResponse,
    error_response,
    read_body,
    request_head,
    send_response,
    send_stream,
)
from routing.proxy.runtime import ProxyRuntime
from routing.proxy.steps import authenticate
from routing.proxy.tracing import tracing_start
from routing.snapshot import ConfigSnapshot
from tenants.contracts import KeyContext

if TYPE_CHECKING:
    from routing.proxy.otel import Tracing

logger = logging.getLogger(__name__)

# Called with the request's key, authenticated against the snapshot it is served with.
Endpoint = Callable[
    [ProxyRequest, ProxyRuntime, ConfigSnapshot, KeyContext],
    Awaitable[Response | StreamingResponse],
]

ENDPOINTS: dict[str, dict[str, Endpoint]] = {
    "/v1/chat/completions": {"POST": endpoints.chat_completions},
    "/v1/embeddings": {"POST": endpoints.embeddings},
    "/v1/models": {"GET": endpoints.list_models},
    "/v1/messages": {"POST": endpoints.messages},
    "/v1/key/info": {"GET": endpoints.key_info},
}
# Endpoints in Anthropic's format answer errors in Anthropic's shape.
ANTHROPIC_FORMAT_PATHS = frozenset({"/v1/messages"})
_MODEL_PATH = "/v1/models/"


def _resolve(method: str, path: str) -> Endpoint:
    """The endpoint for this method and path; 404 or 405 otherwise."""
    path = path.rstrip("/") or path
    methods = ENDPOINTS.get(path)
    if methods is None and path.startswith(_MODEL_PATH) and len(path) > len(_MODEL_PATH):
        model = path[len(_MODEL_PATH) :]
        methods = {
            "GET": lambda request, runtime, snapshot, key: endpoints.retrieve_model(
                request, runtime, snapshot, key, model
            )
        }
    if methods is None:
        raise NotFound(f"Unknown endpoint: {method} {path}", code="unknown_url")
    endpoint = methods.get(method)
    if endpoint is None:
        raise MethodNotAllowed(
            f"{method} is not allowed on {path}; use {', '.join(methods)}.",
            headers={"allow": ", ".join(methods)},
        )
    return endpoint


class ProxyApp:
    """Serves /v1/ and owns the proxy runtime through the ASGI lifespan."""

    def __init__(self) -> None:
        self.runtime = ProxyRuntime()
        self._started = False
        # Several workers: each one's counters for /metrics, in TOLLGATE_METRICS_DIR.
        self.snapshots: observe.SnapshotWriter | None = None
        self.tracing: Tracing | None = None  # OpenTelemetry, when OTEL_* asks for it

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if not self._started:  # a server without lifespan support
            await self._start()
        if self.tracing is None:
            await self._http(scope, receive, send)
        else:
            await self.tracing.serve(self._http, scope, receive, send)

    async def _start(self) -> None:
        self._started = True
        self.tracing = tracing_start()
        await self.runtime.start()
        self.snapshots = observe.snapshots_start(self.runtime.usage)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self._start()
                except Exception as exc:
                    logger.exception("Proxy startup failed")
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.runtime.stop()
                if self.snapshots is not None:
                    await self.snapshots.stop()  # the last requests' counts outlive the worker
                if self.tracing is not None:
                    # After the runtime: the spans of requests it let finish are exported too.
                    await asyncio.to_thread(self.tracing.shutdown)
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        response: Response | StreamingResponse
        request_id = None
        started = observe.request_started()
        anthropic = scope["path"].rstrip("/") in ANTHROPIC_FORMAT_PATHS
        try:
            endpoint = _resolve(scope["method"], scope["path"])
            max_bytes = settings.TOLLGATE_MAX_REQUEST_BYTES
            request = request_head(scope, max_bytes=max_bytes)
            request_id = request.request_id
            snapshot = self.runtime.snapshot
            # Before the body: a client without a valid key cannot make the gateway
            # buffer one (up to max_bytes per connection).
            key = authenticate(request, snapshot)
            request.body = await read_body(receive, max_bytes=max_bytes)
            response = await endpoint(request, self.runtime, snapshot, key)
        except ClientGone:
            observe.request_finished(
                scope, request_id=request_id, status=observe.CLIENT_DISCONNECTED, headers={},
                started=started,
            )  # fmt: skip
            return
        except GatewayError as exc:
            response = error_response(exc, request_id=request_id, anthropic=anthropic)
        except Exception:
            logger.exception("Unhandled error on %s %s", scope["method"], scope["path"])
            response = error_response(
                GatewayError("The gateway failed to handle the request."),
                request_id=request_id,
                anthropic=anthropic,
            )
        try:
            if isinstance(response, StreamingResponse):
                await send_stream(send, receive, response)
            else:
                await send_response(send, response)
        finally:
            # After the answer (a stream: its end, when its usage is recorded too).
            observe.request_finished(
                scope, request_id=request_id, status=response.status, headers=response.headers,
                started=started,
            )  # fmt: skip
