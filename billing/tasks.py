"""Celery tasks of the billing app."""

import asyncio
import logging
import time

from celery import shared_task
from django.conf import settings

from billing.inflight import inflight_reap
from billing.stream import (
    DrainCounts,
    usage_stream_async_client,
    usage_stream_client,
    usage_stream_consumer_name,
    usage_stream_drain,
    usage_stream_forget_idle_consumers,
)

logger = logging.getLogger(__name__)

# Longest wait for new entries in one read: short, so the run ends on time.
_BLOCK_MS = 500
# Consumers (worker processes) silent this long and holding nothing are forgotten.
_FORGET_CONSUMERS_IDLE_MS = 24 * 3600 * 1000


@shared_task(ignore_result=True)
def drain_usage_events() -> dict[str, int]:
    """Move usage events from the Redis Stream to the ledger for about one beat interval.

    Beat starts one every TOLLGATE_USAGE_DRAIN_SECONDS, so one is nearly
    always reading. Overlapping runs are harmless: the consumer group hands
    each entry to one consumer, and the ledger ignores an event it already has.
    Each run first writes the events that dead web processes left in flight.
    """
    deadline = time.monotonic() + settings.TOLLGATE_USAGE_DRAIN_SECONDS
    try:
        reaped = asyncio.run(_reap_dead_processes_entries())
    except Exception:
        # Ingestion must not wait on it: the entries stay for the next drain.
        logger.exception("Writing the usage events of dead web processes failed")
        reaped = 0
    consumer = usage_stream_consumer_name()
    claim_idle_ms = int(settings.TOLLGATE_USAGE_CLAIM_IDLE_SECONDS * 1000)
    total = DrainCounts()
    client = usage_stream_client()
    try:
        while (left_ms := int((deadline - time.monotonic()) * 1000)) > 0:
            total += usage_stream_drain(
                consumer=consumer,
                max_batches=20,
                batch_size=settings.TOLLGATE_USAGE_BATCH_SIZE,
                claim_idle_ms=claim_idle_ms,
                block_ms=max(1, min(_BLOCK_MS, left_ms)),
                client=client,
            )
        usage_stream_forget_idle_consumers(idle_ms=_FORGET_CONSUMERS_IDLE_MS, client=client)
    finally:
        client.close()
    if total.read:
        logger.info("Usage drain: %s", total)
    return {
        "written": total.written, "dead": total.dead, "claimed": total.claimed, "reaped": reaped,
    }  # fmt: skip


async def _reap_dead_processes_entries() -> int:
    """Write the events dead web processes left in flight (billing/inflight.py)."""
    client = usage_stream_async_client(settings.REDIS_URL)
    try:
        return await inflight_reap(client, settings.TOLLGATE_USAGE_STREAM)
    finally:
        await client.aclose()
