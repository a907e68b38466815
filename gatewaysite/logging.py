"""Logs as one JSON object per line (LOG_FORMAT=json), and the dashboard/API access log.

Access lines go to the `tollgate.access` logger: the proxy writes one per /v1 request
(`routing/proxy/observe.py`), `access_log_middleware` one per request Django serves.
They are built as a JSON object once; in json mode the formatter only puts the time,
level and logger in front. Never a body, a header, a query string or a secret.
"""

import logging
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from asgiref.sync import iscoroutinefunction
from django.http import HttpRequest, HttpResponseBase
from django.utils.decorators import sync_and_async_middleware

ACCESS_LOGGER = "tollgate.access"
access_logger = logging.getLogger(ACCESS_LOGGER)

# What every LogRecord has; anything else was passed in `extra` and is kept if plain.
_RECORD_FIELDS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
    "color_message",  # uvicorn's copy of the message with terminal colours
}
_PLAIN = (str, int, float, bool, type(None))
# URL parameters that carry a secret (an invitation link's token): never logged.
_SECRET_URL_KWARGS = frozenset({"token", "key", "secret", "password", "signature", "uidb64"})
_REDACTED = "[redacted]"
_MAX_PATH = 1024
_SLUG = re.compile(r"[-a-zA-Z0-9_]{1,64}")


class PlainFormatter(logging.Formatter):
    """`%(asctime)s` as UTC ISO 8601 with milliseconds, formatted once a second (the
    default formats the local time anew for every line: a third of an access line's cost)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._second_text: tuple[int, str] = (-1, "")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return self.timestamp(record.created)

    def timestamp(self, created: float) -> str:
        second = int(created)
        cached_second, text = self._second_text  # one tuple: safe if handlers share us
        if cached_second != second:
            text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._second_text = (second, text)
        return f"{text}.{int((created - second) * 1000):03d}Z"


class JsonFormatter(PlainFormatter):
    """One JSON object a line: `ts` (UTC, ms), `level`, `logger`, `message`, the traceback
    as `exception`, and any plain `extra` fields."""

    def format(self, record: logging.LogRecord) -> str:
        timestamp = self.timestamp(record.created)
        level = record.levelname.lower()
        message = record.getMessage()
        if (
            record.name == ACCESS_LOGGER
            and len(message) > 2
            and message[0] == "{"
            and message[-1] == "}"
            and not record.exc_info
        ):
            # Already a JSON object, serialised once by its writer.
            return f'{{"ts":"{timestamp}","level":"{level}","logger":"{record.name}",{message[1:]}'
        payload: dict[str, Any] = {
            "ts": timestamp,
            "level": level,
            "logger": record.name,
            "message": message,
        }
        for name, value in vars(record).items():
            if name not in _RECORD_FIELDS and isinstance(value, _PLAIN):
                payload.setdefault(name, value)
        if record.exc_info:
            payload["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            payload["stack"] = self.formatStack(record.stack_info)
        return orjson.dumps(payload, default=str).decode()


# ---------------------------------------------------------------- Django's access log


def _logged_path(request: HttpRequest) -> str:
    """The path without its query string, and with secret URL parameters redacted."""
    path = request.path
    match = request.resolver_match
    if match is not None:
        for name, value in match.kwargs.items():
            if name in _SECRET_URL_KWARGS and isinstance(value, str) and value:
                path = path.replace(value, _REDACTED)
    return path[:_MAX_PATH]


def _user_id(request: HttpRequest) -> int | None:
    """The signed-in user's id if the request already looked it up (reading
    `request.user` here would cost a session query on pages that never do)."""
    user = getattr(request, "_cached_user", None)
    if user is None:
        # DRF sets its authenticated principal (a user, or an API token's) here.
        user = vars(request).get("user")
    if user is None or not getattr(user, "is_authenticated", False):
        return None
    pk = getattr(user, "pk", None)
    return pk if isinstance(pk, int) else None


def django_access_line(
    request: HttpRequest, response: HttpResponseBase, elapsed_s: float
) -> dict[str, Any]:
    """The access-log fields of one request Django answered."""
    match = request.resolver_match
    asked_org = request.GET.get("org", "")
    line: dict[str, Any] = {
        "source": "django",
        "method": request.method,
        "path": _logged_path(request),
        "route": match.route if match is not None else None,
        "status": response.status_code,
        "latency_ms": round(elapsed_s * 1000, 1),
        "user_id": _user_id(request),
        # The org a dashboard or API call named (?org=), when it is a well-formed slug.
        "org": asked_org if _SLUG.fullmatch(asked_org) else None,
        "client": request.META.get("REMOTE_ADDR"),
    }
    token = vars(request).get("auth")  # DRF: the API token that authenticated the call
    org_id, prefix = getattr(token, "org_id", None), getattr(token, "prefix", None)
    if isinstance(org_id, int) and isinstance(prefix, str):
        line["org_id"] = org_id
        line["token_prefix"] = prefix
    return line


def _log_request(request: HttpRequest, response: HttpResponseBase, started: float) -> None:
    if access_logger.isEnabledFor(logging.INFO):
        line = django_access_line(request, response, time.monotonic() - started)
        access_logger.info(orjson.dumps(line).decode())


Handler = Callable[[HttpRequest], HttpResponseBase]
AsyncHandler = Callable[[HttpRequest], Awaitable[HttpResponseBase]]


@sync_and_async_middleware
def access_log_middleware(
    get_response: Handler | AsyncHandler,
) -> Handler | AsyncHandler:
    """One `tollgate.access` line per request Django serves (first in MIDDLEWARE, so
    its latency covers the other middleware). It takes the mode of the middleware
    after it, sync or async, so it adds no thread hop of its own."""
    if iscoroutinefunction(get_response):
        get_async: AsyncHandler = get_response  # type: ignore[assignment]

        async def middleware(request: HttpRequest) -> HttpResponseBase:
            started = time.monotonic()
            response = await get_async(request)
            _log_request(request, response, started)
            return response

        return middleware

    get_sync: Handler = get_response  # type: ignore[assignment]

    def sync_middleware(request: HttpRequest) -> HttpResponseBase:
        started = time.monotonic()
        response = get_sync(request)
        _log_request(request, response, started)
        return response

    return sync_middleware
