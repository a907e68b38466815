"""Live request feed: new ledger rows pushed to the dashboard over the channel layer.

After each batch is written, one message per organization goes to the group
`live.org.<id>` with a summary row per request (never bodies or secrets). The
dashboard's websocket consumer (dashboard/live.py) filters it for the viewer.

Publishing is best effort: it never raises into ingestion and never waits long.
The in-memory layer of the embedded default is bound to the event loop that
serves the websockets, while ingestion writes from a worker thread; so messages
are handed to that loop (which the consumer registers when it connects) instead
of being sent from a throwaway loop that no consumer listens on.
"""

import asyncio
import logging
from collections.abc import Sequence
from concurrent.futures import Future
from typing import Any

from asgiref.sync import async_to_sync
from channels.layers import BaseChannelLayer, InMemoryChannelLayer, get_channel_layer

from billing.contracts import UsageRecord

logger = logging.getLogger(__name__)

# Longest a batch's publishing may hold up ingestion (Redis slow or away).
PUBLISH_TIMEOUT_S = 2.0
MESSAGE_TYPE = "live.usage"


def live_group(org_id: int) -> str:
    """The channel-layer group that carries an organization's live requests."""
    return f"live.org.{org_id}"


def live_row(record: UsageRecord) -> dict[str, Any]:
    """What the live feed shows of one request: plain JSON types, money in nanos."""
    return {
        "id": str(record.event_id),
        "started_at": record.started_at.isoformat(),
        "key_id": record.key_id,
        "team_id": record.team_id,
        "model": record.model,
        "status_code": record.status_code,
        "outcome": record.outcome,
        "input_tokens": record.usage.input_tokens,
        "output_tokens": record.usage.output_tokens,
        "cost_nanos": record.cost_nanos,
        "latency_ms": record.latency_ms,
        "is_stream": record.is_stream,
    }


class _ServingLoop:
    """The event loop this process serves websockets on, once a consumer has connected."""

    loop: asyncio.AbstractEventLoop | None = None


def live_serving_loop_register(loop: asyncio.AbstractEventLoop) -> None:
    """Record the loop consumers listen on (called by each consumer as it connects)."""
    _ServingLoop.loop = loop


def _serving_loop() -> asyncio.AbstractEventLoop | None:
    loop = _ServingLoop.loop
    return loop if loop is not None and loop.is_running() else None


async def _send_all(layer: BaseChannelLayer, messages: dict[int, list[dict[str, Any]]]) -> None:
    async with asyncio.timeout(PUBLISH_TIMEOUT_S):
        for org_id, rows in messages.items():
            await layer.group_send(live_group(org_id), {"type": MESSAGE_TYPE, "requests": rows})


def _log_failure(future: Future[None]) -> None:
    if not future.cancelled() and (error := future.exception()) is not None:
        logger.warning("Publishing live usage failed: %r", error)


def usage_live_publish(records: Sequence[UsageRecord]) -> None:
    """Publish a written batch to each organization's live group; never raises."""
    try:
        layer = get_channel_layer()
        if layer is None or not records:
            return
        messages: dict[int, list[dict[str, Any]]] = {}
        for record in records:
            messages.setdefault(record.org_id, []).append(live_row(record))
        serving = _serving_loop()
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if serving is not None and serving is not running:
            # Handed over, not awaited: ingestion does not wait for the websockets.
            future = asyncio.run_coroutine_threadsafe(_send_all(layer, messages), serving)
            future.add_done_callback(_log_failure)
        elif running is not None:
            task = running.create_task(_send_all(layer, messages))
            task.add_done_callback(_log_failure)  # type: ignore[arg-type]
        elif not isinstance(layer, InMemoryChannelLayer):
            # A worker process (Celery ingestion): a short-lived loop reaches Redis.
            async_to_sync(_send_all)(layer, messages)
        # In memory with no consumer yet: nobody in this process is listening.
    except Exception:
        logger.exception("Publishing live usage failed; the events are stored all the same")
