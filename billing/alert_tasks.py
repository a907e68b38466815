"""Celery tasks of budget alerts (scheduled by CELERY_BEAT_SCHEDULE in gatewaysite/settings.py).

Each task takes ids, calls one service and is idempotent: recording is
exact-once by database constraints, and an attempt claims its delivery first.
"""

import asyncio
from datetime import datetime, timedelta

from celery import Task, shared_task
from django.conf import settings
from django.db import transaction
from django.utils import timezone

from billing.alerts import (
    abudget_alerts_check,
    alert_deliveries_due,
    alert_delivery_attempt,
    alert_delivery_next_at,
    spend_spikes_detect,
)
from billing.budget_counters import redis_budget_counters

# A delivery due this long without being attempted lost its Celery retry.
SWEEP_GRACE = timedelta(minutes=1)


def _enqueue(delivery_ids: list[int]) -> None:
    for delivery_id in delivery_ids:
        # After commit: a worker must find the delivery row when it runs.
        transaction.on_commit(lambda d=delivery_id: alert_deliver.delay(d))


async def _check(at: datetime) -> list[int]:
    async with redis_budget_counters(settings.REDIS_URL) as counters:
        return await abudget_alerts_check(counters=counters, at=at)


@shared_task(name="billing.budget_alerts_check", ignore_result=True)
def budget_alerts_check() -> int:
    """Record the alerts every budget's standing calls for, and send them."""
    delivery_ids = asyncio.run(_check(timezone.now()))
    _enqueue(delivery_ids)
    return len(delivery_ids)


@shared_task(name="billing.spend_spikes_check", ignore_result=True)
def spend_spikes_check() -> int:
    """Record spend-spike alerts for the last 60 minutes, and send them."""
    delivery_ids = spend_spikes_detect(at=timezone.now())
    _enqueue(delivery_ids)
    return len(delivery_ids)


@shared_task(name="billing.alert_deliver", bind=True, ignore_result=True)
def alert_deliver(self: Task, delivery_id: int) -> bool:
    """Attempt one delivery; retry it with backoff while it stays pending."""
    if alert_delivery_attempt(delivery_id):
        return True
    next_at = alert_delivery_next_at(delivery_id)
    # Eagerly (no broker) a retry would run at once, in a loop: the sweep retries instead.
    if next_at is None or self.request.is_eager:
        return False
    countdown = max(0.0, (next_at - timezone.now()).total_seconds())
    raise self.retry(countdown=countdown, max_retries=settings.TOLLGATE_ALERT_MAX_ATTEMPTS)


@shared_task(name="billing.alert_deliveries_sweep", ignore_result=True)
def alert_deliveries_sweep() -> int:
    """Re-enqueue deliveries overdue by more than a minute (their Celery retry was lost)."""
    delivery_ids = alert_deliveries_due(at=timezone.now() - SWEEP_GRACE)
    _enqueue(delivery_ids)
    return len(delivery_ids)
