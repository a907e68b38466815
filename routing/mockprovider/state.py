"""Per-server and per-request state, kept on the aiohttp application and request."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any, Final

from aiohttp import web

from .options import MockOptions

REQUEST_LOG_SIZE: Final = 200


@dataclass(frozen=True, slots=True)
class MockState:
    """One mock server's configuration and its ring buffer of received requests."""

    defaults: MockOptions
    required_key: str | None = None
    requests: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=REQUEST_LOG_SIZE))


@dataclass(frozen=True, slots=True)
class ParsedBody:
    """A request body read once: its JSON value, and whether it parsed at all."""

    value: Any
    valid: bool


STATE: Final = web.AppKey("state", MockState)
BODY: Final = web.RequestKey("body", ParsedBody)
