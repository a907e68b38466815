"""Write-ahead usage entries: a web process that dies mid-request loses no usage event.

A request's usage event is made when the request ends, in the process serving it, and
sent to the Redis Stream within one flush interval (billing/stream.py). A process killed
outright (SIGKILL, out of memory, a lost host) would take along the events of the
requests it was serving and of those it had not sent yet. So every request leaves an
*in-flight entry* in Redis, holding its usage record as far as admission knows it and its
budget lines, deleted by the script that appends its real event to the stream. One
admitted on budgets or rate limits writes it with its reserve (the same script, no extra
round trip); any other writes it when it first calls upstream, through the usage
producer's next write (within `BEGIN_FLUSH_S`, 50 ms; a request answered by then needs
none). Each web process says it is alive every few seconds (for
TOLLGATE_PROCESS_LIVE_SECONDS).

`inflight_reap`, run by the usage drain task, takes the entries of processes that stopped
saying so and, for each:
- not settled: voids it on its budgets (holds released; a late settle takes nothing)
  and emits its event with error class `worker_lost`, unpriced and at no cost: what
  the provider billed for a stream cut halfway is unknown here;
- settled (the process died between settling and sending): emits it at the cost it
  settled, so budget counters and ledger still agree.
Each event is appended atomically with deleting its entry: an entry is reaped once, and
a real event that reached the stream first wins (the ledger keeps the first of an id).

The entry of a budget lease (billing/budget_leases.py) has no event: reaping it
releases the lease's hold at once, rather than at its deadline. Requests admitted from a
lease write their entries through `begin`, as those with no reserve.

Still lost with their process: a request with no reserve (or admitted from a lease) in
its first 50 ms upstream, and the events of requests that never called upstream (a cache
hit, a refusal) not yet sent (one flush interval). A live process silent for longer than
the TTL (its event loop blocked that long) is taken for dead: its requests then count as
lost.
"""

import logging
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import orjson
import redis.asyncio

from billing.budget_counters import BudgetLine, RedisBudgetCounters
from billing.contracts import UsageRecord
from billing.models import UsageEvent
from billing.stream import (
    ENTRY_FIELD,
    inflight_hash_key,
    inflight_live_key,
    inflight_producers_key,
    usage_record_encode,
)

logger = logging.getLogger(__name__)

WORKER_LOST = "worker_lost"  # the error class of an event its process never wrote

# Append the event only if the entry was still there: the real event deletes it.
_REAP_LUA = """
if redis.call('HDEL', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('XADD', KEYS[2], '*', ARGV[2], ARGV[3])
return 1
"""


# What an entry keeps of its request: the UsageRecord fields admission knows. The rest
# is the lost request's (WORKER_LOST, no usage) or the reaper's (finish, cost).
KEPT_FIELDS = frozenset(
    ("org_id", "team_id", "key_id", "endpoint", "model", "started_at", "route_id", "is_stream",
     "tags", "end_user")
)  # fmt: skip


def inflight_payload(known: dict[str, object], lines: Sequence[BudgetLine] = ()) -> bytes:
    """An entry: `known` (the KEPT_FIELDS) and the key prefixes of the request's lines."""
    return orjson.dumps({**known, "lines": [line.key_prefix for line in lines]})


def inflight_lease_payload(lines: Sequence[BudgetLine]) -> bytes:
    """The entry of a budget lease (billing/budget_leases.py): its hold is released when
    its process dies, and no event is made of it."""
    return orjson.dumps({"lease": True, "lines": [line.key_prefix for line in lines]})


def _lost_record(request_id: str, kept: dict[str, Any], *, settled: int | None) -> UsageRecord:
    """The event of a request its process never wrote: at the cost it settled, if it did."""
    fields = {name: kept[name] for name in KEPT_FIELDS}
    fields["started_at"] = datetime.fromisoformat(kept["started_at"])
    fields["tags"] = tuple(kept["tags"])
    return UsageRecord(
        event_id=uuid.UUID(request_id),
        outcome=UsageEvent.Outcome.UPSTREAM_ERROR,
        status_code=502,
        finished_at=datetime.now(UTC),
        error_class=WORKER_LOST,
        attempts=0,
        cost_nanos=settled or 0,
        priced=settled is not None,
        **fields,
    )


async def inflight_reap(client: redis.asyncio.Redis, stream: str) -> int:
    """Emit to `stream` the events of requests whose process died before it could; how many."""
    counters = RedisBudgetCounters(client)
    producers_key = inflight_producers_key(stream)
    reaped = 0
    for raw in await client.smembers(producers_key):
        producer = raw.decode()
        if await client.exists(inflight_live_key(stream, producer)):
            continue
        hash_key = inflight_hash_key(stream, producer)
        for request_id, entry in (await client.hgetall(hash_key)).items():
            reaped += await _reap(client, counters, hash_key, stream, request_id.decode(), entry)
        # A dead process adds nothing more: forget it once its entries are gone.
        if not await client.exists(hash_key):
            await client.srem(producers_key, producer)
    if reaped:
        logger.warning("Wrote %d usage events that dead web processes left unwritten", reaped)
    return reaped


async def _reap(
    client: redis.asyncio.Redis, counters: RedisBudgetCounters, hash_key: str, stream: str,
    request_id: str, entry: bytes,
) -> int:  # fmt: skip
    try:
        kept = orjson.loads(entry)
        lines = [str(prefix) for prefix in kept["lines"]]
        if kept.get("lease"):
            await counters.abandon(request_id, lines)  # its hold released, now
            await client.hdel(hash_key, request_id)
            return 0
        settled = await counters.abandon(request_id, lines)
        payload = usage_record_encode(_lost_record(request_id, kept, settled=settled))
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        logger.exception("In-flight entry %s is unreadable; dropped: %r", request_id, entry[:200])
        await client.hdel(hash_key, request_id)
        return 0
    return int(await client.eval(_REAP_LUA, 2, hash_key, stream, request_id, ENTRY_FIELD, payload))
