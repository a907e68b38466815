"""Request and response bodies kept for the request log: size cap and retention.

Only organizations that turn on `log_request_bodies` get any. Bodies live in
`UsageEventBody`, one row per event, and go before their event does: after
TOLLGATE_BODY_LOG_RETENTION_DAYS (default 30), and in any case with the event
(TOLLGATE_USAGE_RETENTION_DAYS), since the row cascades with it.
"""

import logging
from datetime import datetime, timedelta

from django.conf import settings
from django.utils import timezone

from billing.models import UsageEventBody

logger = logging.getLogger(__name__)


def body_log_max_bytes() -> int:
    """Bytes kept of each body (TOLLGATE_BODY_LOG_MAX_BYTES), read at call time."""
    return settings.TOLLGATE_BODY_LOG_MAX_BYTES


def body_log_retention_days() -> int:
    """Days bodies are kept: TOLLGATE_BODY_LOG_RETENTION_DAYS, never past the events' own."""
    days = settings.TOLLGATE_BODY_LOG_RETENTION_DAYS
    return min(days, settings.TOLLGATE_USAGE_RETENTION_DAYS)


def usage_bodies_prune(*, now: datetime | None = None, batch_size: int = 5000) -> int:
    """Delete bodies of requests older than the body retention; returns how many went.

    In batches by primary key, so a large backlog never holds one long lock.
    """
    cutoff = (now or timezone.now()) - timedelta(days=body_log_retention_days())
    old = UsageEventBody.objects.filter(started_at__lt=cutoff).order_by()
    deleted = 0
    while ids := list(old.values_list("pk", flat=True)[:batch_size]):
        deleted += UsageEventBody.objects.filter(pk__in=ids).delete()[0]
    if deleted:
        logger.info("Pruned %d logged request bodies from before %s", deleted, cutoff)
    return deleted
