"""Per-request mock options, from headers, model-name directives and server defaults."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final, Literal

NamedFault = Literal["hang", "reset", "malformed", "truncated", "blocked"]
# An int fault is an HTTP status the mock answers with instead of a completion;
# `blocked` is a prompt refused by safety filters, which only Gemini's API can express.
Fault = int | NamedFault | None

HEADER_PREFIX: Final = "x-mock-"
MAX_DELAY_MS: Final = 3_600_000
# Caps keep one request from exhausting the mock's memory during a benchmark.
MAX_TOKENS: Final = 100_000
MAX_DIMENSIONS: Final = 16_384
MAX_RETRY_AFTER_S: Final = 86_400
# Enough to prove a gateway bounds what it buffers, small enough not to take the machine down.
MAX_PAD_BYTES: Final = 64 * 1024 * 1024


class OptionError(ValueError):
    """An option name or value the mock cannot honour; the server answers 400."""


@dataclass(frozen=True, slots=True)
class MockOptions:
    """How the mock behaves for one request."""

    latency_ms: int = 0
    ttft_ms: int = 0
    chunk_delay_ms: int = 0
    # How long after a stream's last event its body ends (a provider that sends `[DONE]`
    # and closes the chunked body in separate writes, a moment apart).
    end_delay_ms: int = 0
    tokens: int = 16
    fault: Fault = None
    retry_after: int | None = 1
    dimensions: int = 8
    # Faults of size, as a misbehaving provider sends them (chat completions only):
    # filler bytes in the answer, and an answer that overruns the request's max_tokens.
    pad_bytes: int = 0
    ignore_max_tokens: bool = False


def _parse_int(name: str, raw: str, low: int, high: int) -> int:
    """Return `raw` as an int in [low, high], or raise OptionError."""
    text = raw.strip()
    if not (text.isascii() and text.isdigit()):
        raise OptionError(f"mock option {name} must be a whole number, got {raw!r}")
    value = int(text)
    if not low <= value <= high:
        raise OptionError(f"mock option {name} must be between {low} and {high}, got {value}")
    return value


def _parse_delay(name: str) -> Callable[[str], int]:
    return lambda raw: _parse_int(name, raw, 0, MAX_DELAY_MS)


def parse_fault(raw: str) -> Fault:
    """Return the fault in `raw`: status 400-599, a named fault, or none."""
    text = raw.strip().lower()
    if text in ("", "none"):
        return None
    if text in ("hang", "reset", "malformed", "truncated", "blocked"):
        return text
    if text.isascii() and text.isdigit() and 400 <= int(text) <= 599:
        return int(text)
    raise OptionError(
        "mock option fault must be a status 400-599, hang, reset, malformed, truncated, "
        f"blocked or none, got {raw!r}"
    )


def parse_bool(name: str) -> Callable[[str], bool]:
    def parse(raw: str) -> bool:
        text = raw.strip().lower()
        if text in ("true", "1", "yes"):
            return True
        if text in ("false", "0", "no"):
            return False
        raise OptionError(f"mock option {name} must be true or false, got {raw!r}")

    return parse


def parse_retry_after(raw: str) -> int | None:
    """Return Retry-After seconds, or None (send no header) for `none`."""
    if raw.strip().lower() == "none":
        return None
    return _parse_int("retry_after", raw, 0, MAX_RETRY_AFTER_S)


PARSERS: Final[MappingProxyType[str, Callable[[str], object]]] = MappingProxyType(
    {
        "latency_ms": _parse_delay("latency_ms"),
        "ttft_ms": _parse_delay("ttft_ms"),
        "chunk_delay_ms": _parse_delay("chunk_delay_ms"),
        "end_delay_ms": _parse_delay("end_delay_ms"),
        "tokens": lambda raw: _parse_int("tokens", raw, 0, MAX_TOKENS),
        "fault": parse_fault,
        "retry_after": parse_retry_after,
        "dimensions": lambda raw: _parse_int("dimensions", raw, 1, MAX_DIMENSIONS),
        "pad_bytes": lambda raw: _parse_int("pad_bytes", raw, 0, MAX_PAD_BYTES),
        "ignore_max_tokens": parse_bool("ignore_max_tokens"),
    }
)


def _field_name(name: str, source: str) -> str:
    """Return the MockOptions field `name` means (`-` and `_` are interchangeable)."""
    field = name.strip().lower().replace("-", "_")
    if field not in PARSERS:
        known = ", ".join(PARSERS)
        raise OptionError(f"unknown mock option {name!r} in {source}; known options: {known}")
    return field


def resolve_options(
    defaults: MockOptions,
    model: str,
    headers: Iterable[tuple[str, str]],
    *,
    prompt_blocking: bool = False,
) -> tuple[str, MockOptions]:
    """Return the base model name and the options for one request.

    Precedence: `x-mock-*` headers, then `BASE+key=value` model directives, then
    `defaults`. `fault=blocked` is an OptionError unless the endpoint can answer
    with a blocked prompt (`prompt_blocking`).
    """
    base, options = _resolved(defaults, model, headers)
    if options.fault == "blocked" and not prompt_blocking:
        raise OptionError("mock option fault=blocked is only answered by the Gemini endpoints")
    return base, options


def _resolved(
    defaults: MockOptions, model: str, headers: Iterable[tuple[str, str]]
) -> tuple[str, MockOptions]:
    """Return the base model name and the options, whichever endpoint asks."""
    base, _, directives = model.partition("+")
    if not base.strip():
        raise OptionError(f"model {model!r} has an empty base name")
    overrides: dict[str, object] = {}
    if directives:
        for directive in directives.split("+"):
            name, sep, raw = directive.partition("=")
            if not sep:
                raise OptionError(f"model directive {directive!r} must look like key=value")
            field = _field_name(name, "the model name")
            overrides[field] = PARSERS[field](raw)
    # Headers are applied last so they win over model directives.
    for name, raw in headers:
        lowered = name.lower()
        if lowered.startswith(HEADER_PREFIX):
            field = _field_name(lowered.removeprefix(HEADER_PREFIX), f"header {name}")
            overrides[field] = PARSERS[field](raw)
    if not overrides:
        return base, defaults
    return base, dataclasses.replace(defaults, **overrides)  # type: ignore[arg-type]
