"""Celery task closing the months that are due (scheduled in gatewaysite/settings.py)."""

from datetime import timedelta

from celery import shared_task
from django.conf import settings

from billing.statements import statements_close_due


def statement_grace() -> timedelta:
    return timedelta(hours=settings.TOLLGATE_STATEMENT_GRACE_HOURS)


@shared_task(name="billing.statements_close_due")
def statements_close_due_task() -> list[str]:
    """Close every organization's ended months, oldest first; idempotent."""
    return [str(statement) for statement in statements_close_due(grace=statement_grace())]
