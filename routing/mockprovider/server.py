"""The mock provider's aiohttp application, test hooks and serve loop."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable
from typing import Any, Final

import orjson
from aiohttp import web

from . import anthropic_api, gemini_api, openai_api
from .errors import Family, MockError, error_response
from .options import MockOptions, OptionError
from .responses import json_response
from .state import BODY, REQUEST_LOG_SIZE, STATE, MockState, ParsedBody

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# Big prompts in benchmarks must not trip aiohttp's 1 MiB default.
MAX_BODY_BYTES: Final = 64 * 1024 * 1024
DEFAULT_LOG_LIMIT: Final = 20
# Seconds in-flight requests (streams, hangs) get to finish once a stop signal arrives.
SHUTDOWN_TIMEOUT_S: Final = 1.0


def _family(path: str) -> Family:
    return Family.ANTHROPIC if path.startswith("/v1/messages") else Family.OPENAI


def _error_response(path: str, error: MockError) -> web.Response:
    """Return `error` in the shape of the API family that serves `path`."""
    if path.startswith("/v1beta/"):
        return gemini_api.error_response(error)
    return error_response(_family(path), error)


def _headers(request: web.Request) -> dict[str, str]:
    """Return all headers with lower-case names; repeated ones joined by ', '."""
    headers: dict[str, str] = {}
    for name, value in request.headers.items():
        key = name.lower()
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    return headers


async def _record(request: web.Request, state: MockState) -> None:
    """Parse the body once for the handler and append the request to the ring buffer."""
    raw = await request.read() if request.body_exists else b""
    try:
        body = ParsedBody(orjson.loads(raw), True) if raw else ParsedBody(None, False)
    except orjson.JSONDecodeError:
        body = ParsedBody(None, False)
    request[BODY] = body
    state.requests.append(
        {
            "method": request.method,
            "path": request.path,
            "query": request.query_string,
            "headers": _headers(request),
            "json": body.value,
        }
    )


def _authorize(request: web.Request, required_key: str | None) -> None:
    """Raise a MockError (401; 400 on Gemini paths) unless an auth header has the key."""
    if required_key is None:
        return
    headers = request.headers
    if (
        headers.get("Authorization") == f"Bearer {required_key}"
        or headers.get("x-api-key") == required_key
        or headers.get("api-key") == required_key
        or headers.get("x-goog-api-key") == required_key
    ):
        return
    if request.path.startswith("/v1beta/"):
        # Gemini rejects a bad key as an invalid argument, with this message.
        raise MockError(400, "API key not valid. Please pass a valid API key.")
    raise MockError(401, "mock provider: missing or incorrect API key")


@web.middleware
async def provider_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Record and authorize API requests; render every failure in provider shape."""
    try:
        if not request.path.startswith("/_mock/"):
            state = request.app[STATE]
            await _record(request, state)
            _authorize(request, state.required_key)
        return await handler(request)
    except MockError as exc:
        return _error_response(request.path, exc)
    except OptionError as exc:
        return _error_response(request.path, MockError(400, str(exc)))
    except web.HTTPException as exc:
        # Unknown paths, wrong methods and oversized bodies get provider-shaped bodies.
        if exc.status < 400:
            raise
        message = f"{exc.reason} ({request.method} {request.path})"
        return _error_response(request.path, MockError(exc.status, message))


def _as_azure(handler: Handler) -> Handler:
    """Serve an OpenAI endpoint the Azure way: deployment in the path, api-version required."""

    async def azure_handler(request: web.Request) -> web.StreamResponse:
        if not request.query.get("api-version"):
            # Azure's own shape for a request it cannot route (code is a string there).
            body = {
                "error": {
                    "code": "MissingApiVersionParameter",
                    "message": "The api-version query parameter (?api-version=) is required "
                    "for all requests.",
                }
            }
            return web.Response(
                status=400, body=orjson.dumps(body), content_type="application/json"
            )
        parsed = request[BODY]
        if isinstance(parsed.value, dict):
            # Azure serves the deployment named in the path, whatever the body says.
            model = {"model": request.match_info["deployment"]}
            request[BODY] = ParsedBody({**parsed.value, **model}, parsed.valid)
        return await handler(request)

    return azure_handler


async def requests_list(request: web.Request) -> web.StreamResponse:
    """Answer GET /_mock/requests with the last `limit` requests, newest last."""
    raw = request.query.get("limit", str(DEFAULT_LOG_LIMIT))
    if not (raw.isascii() and raw.isdigit()) or not 0 <= int(raw) <= REQUEST_LOG_SIZE:
        raise MockError(400, f"limit must be a whole number from 0 to {REQUEST_LOG_SIZE}")
    recorded = list(request.app[STATE].requests)
    limit = int(raw)
    return json_response(recorded[len(recorded) - limit :] if limit else [])


async def requests_clear(request: web.Request) -> web.StreamResponse:
    """Answer DELETE /_mock/requests by emptying the ring buffer."""
    request.app[STATE].requests.clear()
    return json_response({"cleared": True})


async def health(request: web.Request) -> web.StreamResponse:
    """Answer GET /_mock/health with 200 while the server runs."""
    return json_response({"status": "ok"})


def create_app(
    defaults: MockOptions | None = None, *, required_key: str | None = None
) -> web.Application:
    """Return the mock provider application with its own request log."""
    app = web.Application(middlewares=[provider_middleware], client_max_size=MAX_BODY_BYTES)
    app[STATE] = MockState(defaults=defaults or MockOptions(), required_key=required_key)
    app.router.add_post("/v1/chat/completions", openai_api.chat_completions)
    app.router.add_post("/v1/embeddings", openai_api.embeddings)
    app.router.add_get("/v1/models", openai_api.list_models)
    app.router.add_get("/v1/models/{model}", openai_api.retrieve_model)
    app.router.add_post("/v1/messages", anthropic_api.messages)
    gemini_model = "/v1beta/models/{model}"
    app.router.add_post(f"{gemini_model}:generateContent", gemini_api.generate_content)
    app.router.add_post(f"{gemini_model}:streamGenerateContent", gemini_api.stream_generate_content)
    app.router.add_post(f"{gemini_model}:batchEmbedContents", gemini_api.batch_embed_contents)
    azure_deployment = "/openai/deployments/{deployment}"
    app.router.add_post(
        f"{azure_deployment}/chat/completions", _as_azure(openai_api.chat_completions)
    )
    app.router.add_post(f"{azure_deployment}/embeddings", _as_azure(openai_api.embeddings))
    app.router.add_get("/_mock/requests", requests_list)
    app.router.add_delete("/_mock/requests", requests_clear)
    app.router.add_get("/_mock/health", health)
    return app


async def serve(
    *, host: str, port: int, defaults: MockOptions, required_key: str | None = None
) -> None:
    """Serve until SIGTERM or SIGINT; print the listening URL once bound."""
    runner = web.AppRunner(
        create_app(defaults, required_key=required_key),
        access_log=None,
        # Cancelling a handler when its client disconnects ends hangs and slow streams.
        handler_cancellation=True,
        shutdown_timeout=SHUTDOWN_TIMEOUT_S,
    )
    await runner.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        site = web.TCPSite(runner, host, port, backlog=2048)
        await site.start()
        bound: Any = runner.addresses[0]
        print(f"mock provider listening on http://{host}:{bound[1]}", flush=True)
        await stop.wait()
    finally:
        await runner.cleanup()
