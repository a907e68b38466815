"""Request-body validation: every malformed field is a 400, never a crash."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from .errors import MockError
from .state import BODY


def body_object(request: web.Request) -> dict[str, Any]:
    """Return the request's JSON object body, or raise a 400 MockError."""
    body = request.get(BODY)
    if body is None or not body.valid:
        raise MockError(400, "request body is not valid JSON")
    if not isinstance(body.value, dict):
        raise MockError(400, "request body must be a JSON object")
    return body.value


def required_str(body: dict[str, Any], name: str) -> str:
    """Return `body[name]` if it is a non-empty string, else raise a 400 MockError."""
    value = body.get(name)
    if value is None:
        raise MockError(400, f"{name}: field required", param=name)
    if not isinstance(value, str) or not value:
        raise MockError(400, f"{name}: must be a non-empty string", param=name)
    return value


def optional_int(body: dict[str, Any], name: str, low: int, high: int) -> int | None:
    """Return `body[name]` if an int in [low, high], None if absent, else raise 400."""
    value = body.get(name)
    if value is None:
        return None
    # bool is an int subclass, but `true` is not a token count.
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise MockError(400, f"{name}: must be an integer from {low} to {high}", param=name)
    return value


def optional_bool(body: dict[str, Any], name: str) -> bool:
    """Return `body[name]` as a bool (absent or null is False), else raise a 400."""
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise MockError(400, f"{name}: must be a boolean", param=name)
    return value


def message_list(body: dict[str, Any]) -> list[dict[str, Any]]:
    """Return `body["messages"]` if a non-empty list of objects, else raise a 400."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise MockError(400, "messages: must be a non-empty array", param="messages")
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise MockError(400, f"messages[{index}]: must be an object", param="messages")
    return messages
