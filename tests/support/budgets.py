"""Budget counter harness: both implementations behind one contract, with a controlled clock.

`budget_harness(kind)` yields a `Harness` whose `counters` and `other` are two
processes' views of the same counters: two Redis clients (separate connection
pools) on one Redis, or, in process, the one instance a single process has.
"redis-multiplexed" is the proxy's setup: its own client
(`billing.redis_multiplex.MultiplexedRedis`, settles deferred to share writes)
beside a redis-py one.
"""

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime

import pytest
import redis.asyncio

from billing.budget_counters import (
    BudgetCounters,
    BudgetLine,
    InProcessBudgetCounters,
    RedisBudgetCounters,
    budget_line,
)
from billing.redis_multiplex import MultiplexedRedis

REDIS_URL = os.environ.get("REDIS_URL", "")
COUNTER_KEYS = ("tollgate:budget:*", "tollgate:rate:*")
START = datetime(2025, 6, 15, 12, tzinfo=UTC)

_NEEDS_REDIS = pytest.mark.skipif(
    not REDIS_URL, reason="needs Redis: REDIS_URL is unset (the embedded run)"
)
HARNESS_KINDS = [
    pytest.param("in-process", id="in-process"),
    pytest.param("redis", id="redis", marks=_NEEDS_REDIS),
    pytest.param("redis-multiplexed", id="redis-multiplexed", marks=_NEEDS_REDIS),
]


class Clock:
    """A wall clock (Unix seconds) that moves only when a test says so."""

    def __init__(self, at: datetime = START) -> None:
        self.now = at.timestamp()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    @property
    def at(self) -> datetime:
        return datetime.fromtimestamp(self.now, tz=UTC)


@dataclass
class Harness:
    kind: str
    clock: Clock
    counters: BudgetCounters
    other: BudgetCounters  # another web process, sharing the counters
    client: redis.asyncio.Redis | None = None

    async def lose_counters(self) -> None:
        """What a Redis flush or a process restart does: every counter is gone."""
        if self.client is None:
            self.counters = self.other = InProcessBudgetCounters(clock=self.clock)
        else:
            await delete_counter_keys(self.client)


async def delete_counter_keys(client: redis.asyncio.Redis) -> None:
    keys = [
        key for pattern in COUNTER_KEYS async for key in client.scan_iter(match=pattern, count=1000)
    ]
    if keys:
        await client.delete(*keys)


@asynccontextmanager
async def budget_harness(kind: str) -> AsyncIterator[Harness]:
    clock = Clock()
    if kind == "in-process":
        counters = InProcessBudgetCounters(clock=clock)
        yield Harness(kind, clock, counters, counters)
        return
    first = redis.asyncio.Redis.from_url(REDIS_URL)
    second = redis.asyncio.Redis.from_url(REDIS_URL)
    multiplexed = MultiplexedRedis.from_url(REDIS_URL)
    await delete_counter_keys(first)
    try:
        yield Harness(
            kind,
            clock,
            RedisBudgetCounters(multiplexed, settle_client=multiplexed.deferred(0.002), clock=clock)
            if kind == "redis-multiplexed"
            else RedisBudgetCounters(first, clock=clock),
            RedisBudgetCounters(second, clock=clock),
            client=first,
        )
    finally:
        await delete_counter_keys(first)
        await first.aclose()
        await second.aclose()
        await multiplexed.aclose()


def line(
    budget_id: int,
    limit_nanos: int,
    *,
    hard: bool = True,
    period: str = "monthly",
    time_zone: str = "UTC",
    at: datetime = START,
) -> BudgetLine:
    return budget_line(
        budget_id=budget_id,
        period=period,
        time_zone=time_zone,
        limit_nanos=limit_nanos,
        hard=hard,
        at=at,
    )
