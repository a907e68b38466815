"""Celery tasks for budget counters: thin, idempotent, no arguments.

Scheduled by CELERY_BEAT_SCHEDULE in gatewaysite/settings.py. The embedded
default runs the same reconciliation in its one process (routing/proxy/runtime.py),
against its in-process counters.
"""

import asyncio
from dataclasses import asdict
from typing import Any

from celery import shared_task
from django.conf import settings

from billing.budget_counters import redis_budget_counters
from billing.budget_ledger import abudget_counters_reconcile


async def _reconcile() -> list[dict[str, Any]]:
    async with redis_budget_counters(settings.REDIS_URL) as counters:
        drifts = await abudget_counters_reconcile(counters=counters)
    return [asdict(drift) for drift in drifts]


@shared_task(name="billing.budget_counters_reconcile", ignore_result=True)
def budget_counters_reconcile_task() -> list[dict[str, Any]]:
    """Check every budget's current-period counter against the ledger; seed or raise it."""
    return asyncio.run(_reconcile())
