"""Provider-shaped error responses (OpenAI or Anthropic, depending on the endpoint)."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from types import MappingProxyType
from typing import Final

import orjson
from aiohttp import web


class Family(enum.Enum):
    """Which provider's wire format an endpoint speaks."""

    OPENAI = "openai"
    ANTHROPIC = "anthropic"


class MockError(Exception):
    """An error the mock answers with, rendered in the endpoint's provider shape."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.headers = headers


# (type, code) as the OpenAI API reports them for each status.
_OPENAI_KINDS: Final = MappingProxyType(
    {
        401: ("invalid_request_error", "invalid_api_key"),
        403: ("permission_error", None),
        429: ("requests", "rate_limit_exceeded"),
    }
)
_ANTHROPIC_TYPES: Final = MappingProxyType(
    {
        400: "invalid_request_error",
        401: "authentication_error",
        403: "permission_error",
        404: "not_found_error",
        413: "request_too_large",
        429: "rate_limit_error",
        529: "overloaded_error",
    }
)


def openai_error_body(status: int, message: str, param: str | None = None) -> dict[str, object]:
    """Return an OpenAI error body whose `type` matches what OpenAI sends."""
    default = ("server_error", None) if status >= 500 else ("invalid_request_error", None)
    kind, code = _OPENAI_KINDS.get(status, default)
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def anthropic_error_body(status: int, message: str) -> dict[str, object]:
    """Return an Anthropic error body whose type matches what Anthropic sends."""
    default = "api_error" if status >= 500 else "invalid_request_error"
    kind = _ANTHROPIC_TYPES.get(status, default)
    return {"type": "error", "error": {"type": kind, "message": message}}


def error_response(family: Family, error: MockError) -> web.Response:
    """Return `error` as JSON in `family`'s shape, with its status and headers."""
    if family is Family.ANTHROPIC:
        body = anthropic_error_body(error.status, error.message)
    else:
        body = openai_error_body(error.status, error.message, error.param)
    return web.Response(
        status=error.status,
        body=orjson.dumps(body),
        content_type="application/json",
        headers=error.headers,
    )
