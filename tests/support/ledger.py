"""Writing usage events straight into the ledger, for tests of what is built from it."""

import uuid
from datetime import datetime

from billing.contracts import TokenUsage, UsageRecord
from billing.ingest import usage_events_write


def usage_event(
    org, when: datetime, cost_nanos: int, *, team=None, model: str = "gpt-4o-mini",
    priced: bool = True,
) -> UsageRecord:  # fmt: skip
    """One successful chat request of `org` at `when`, costing `cost_nanos`."""
    return UsageRecord(
        event_id=uuid.uuid4(), org_id=org.pk, team_id=team.pk if team else None, key_id=None,
        endpoint="chat.completions", model=model, outcome="success", status_code=200,
        started_at=when, finished_at=when, provider_kind="openai", upstream_model=model,
        usage=TokenUsage(input_tokens=100, output_tokens=10), cost_nanos=cost_nanos,
        priced=priced,
    )  # fmt: skip


def record_usage(
    org, when: datetime, cost_nanos: int, *, team=None, model: str = "gpt-4o-mini",
    priced: bool = True,
) -> None:  # fmt: skip
    """Write one `usage_event` to the ledger."""
    usage_events_write([usage_event(org, when, cost_nanos, team=team, model=model, priced=priced)])
