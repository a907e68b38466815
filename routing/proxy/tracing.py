"""OpenTelemetry traces for the proxy: off unless the standard OTEL_* variables ask for them.

Off (the default), this module is all of it that is loaded: no tracing SDK, no
exporter, no tracer, and the request path pays a `None` check (a context variable
read where the hook is far from the request). On, `routing.proxy.otel`
builds the tracer provider once per process; see docs/observability.md.
"""

import logging
import os
from collections.abc import Mapping
from contextvars import ContextVar
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from routing.proxy.otel import RequestTrace, Tracing

logger = logging.getLogger(__name__)

# The trace of the request the current task serves. Set only while tracing is on,
# by the request's own task, so concurrent requests never see each other's.
REQUEST_TRACE: ContextVar["RequestTrace | None"] = ContextVar(
    "tollgate_request_trace", default=None
)


def current_trace() -> "RequestTrace | None":
    """The trace of the request being served, or None (always None when tracing is off)."""
    return REQUEST_TRACE.get()


def trace_exporters_named(environ: Mapping[str, str]) -> list[str]:
    """The span exporters the environment asks for; empty means tracing is off.

    `OTEL_SDK_DISABLED=true` turns everything off; `OTEL_TRACES_EXPORTER` names the
    exporters (`none` for none); without it, an OTLP endpoint asks for OTLP.
    """
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return []
    named = environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if named:
        return [
            name for name in (part.strip() for part in named.split(",")) if name not in ("", "none")
        ]
    endpoint = environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or environ.get(
        "OTEL_EXPORTER_OTLP_ENDPOINT"
    )
    return ["otlp"] if endpoint and endpoint.strip() else []


def tracing_start() -> "Tracing | None":
    """This process's tracer provider if the environment asks for traces, else None.

    Call once per process, at startup; the tracing SDK is imported only here, and only
    when on. The SDK reads the rest of its OTEL_* variables itself.
    """
    exporters = trace_exporters_named(os.environ)
    if not exporters:
        return None
    try:
        from routing.proxy.otel import Tracing

        return Tracing.from_environment(exporters)
    except Exception:
        # Traces are an aid: a bad OTEL_* setting must not keep the proxy from serving.
        logger.exception("Tracing could not start; serving without it")
        return None
