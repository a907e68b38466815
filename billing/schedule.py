"""The periodic jobs Celery beat runs in production, for the embedded default.

The embedded default has no Celery: its one process runs these jobs itself (see
`routing/proxy/runtime.py`), in its database thread, so rollups, statements and
retention work the same with one command.
"""

from collections.abc import Callable
from dataclasses import dataclass

from django.conf import settings

from billing.reconciliation import rollups_reconcile_recent, usage_events_prune
from billing.rollups import rollups_refresh
from billing.statement_tasks import statement_grace
from billing.statements import statements_close_due


@dataclass(frozen=True, slots=True)
class PeriodicJob:
    name: str
    every_s: float
    run: Callable[[], object]


EMBEDDED_JOBS = (
    PeriodicJob("rollups refresh", settings.TOLLGATE_ROLLUP_SECONDS, rollups_refresh),
    PeriodicJob("statements close", 3_600.0, lambda: statements_close_due(grace=statement_grace())),
    PeriodicJob("rollups reconcile", 86_400.0, rollups_reconcile_recent),
    PeriodicJob("usage events prune", 86_400.0, usage_events_prune),
)
