"""Celery tasks for rollups, reconciliation and retention: thin, idempotent, no arguments.

Scheduled by CELERY_BEAT_SCHEDULE in gatewaysite/settings.py.
"""

from dataclasses import asdict
from typing import Any

from celery import shared_task

from billing.bodies import usage_bodies_prune
from billing.reconciliation import rollups_reconcile_recent, usage_events_prune
from billing.rollups import rollups_refresh


@shared_task(name="billing.rollups_refresh")
def rollups_refresh_task() -> dict[str, Any]:
    """Rebuild the hours and days that gained events since the last run."""
    return asdict(rollups_refresh())


@shared_task(name="billing.rollups_reconcile")
def rollups_reconcile_task() -> str:
    """Check the last two complete UTC days against the raw events; repair and record."""
    return rollups_reconcile_recent().status


@shared_task(name="billing.usage_events_prune")
def usage_events_prune_task() -> dict[str, Any]:
    """Delete logged bodies past their retention, then raw events past
    TOLLGATE_USAGE_RETENTION_DAYS whose days reconcile (their bodies go with them)."""
    bodies = usage_bodies_prune()
    result = usage_events_prune()
    return {
        "days": result.days,
        "events": result.events,
        "blocked_on": str(result.blocked_on),
        "bodies": bodies,
    }
