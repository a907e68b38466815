"""Budget and rate leases (billing/budget_leases.py): a busy profile's requests are
admitted from room its process holds in Redis, and hard budgets stay exact.

The script's lease operations run on a controlled clock; the leasing counters run on
real time against real Redis, as in a web process.
"""

import asyncio
import random
from collections import Counter
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Any

import pytest
import pytest_asyncio
import redis.asyncio
from redis.exceptions import ConnectionError as RedisConnectionError

from billing.budget_counters import (
    BudgetCounters,
    BudgetLine,
    RateBucket,
    RateCharge,
    RedisBudgetCounters,
    ReserveStatus,
)
from billing.budget_leases import LeasedBudgetCounters
from tests.support.budgets import REDIS_URL, Clock, delete_counter_keys, line

pytestmark = [
    pytest.mark.asyncio,
    pytest.mark.skipif(not REDIS_URL, reason="needs Redis: REDIS_URL is unset (the embedded run)"),
]

IDLE_S = 0.3


class CountingRedis:
    """A real Redis client that counts the budget script's operations it sends, and can
    be told to fail one kind."""

    def __init__(self, client: redis.asyncio.Redis) -> None:
        self.client = client
        self.ops: Counter[str] = Counter()
        self.failing: set[str] = set()

    async def evalsha(self, sha: str, numkeys: int, *keys_and_args: Any) -> Any:
        op = keys_and_args[numkeys]
        op = op.decode() if isinstance(op, bytes) else op
        last = keys_and_args[-1]
        if op == "settle" and isinstance(last, str) and last.startswith("lease:"):
            op = "settle from a lease"
        if op in self.failing:
            raise RedisConnectionError(f"{op} failed (test)")
        self.ops[op] += 1
        return await self.client.evalsha(sha, numkeys, *keys_and_args)

    async def eval(self, script: str, numkeys: int, *keys_and_args: Any) -> Any:
        return await self.client.eval(script, numkeys, *keys_and_args)


@pytest_asyncio.fixture
async def client() -> AsyncIterator[redis.asyncio.Redis]:
    client = redis.asyncio.Redis.from_url(REDIS_URL)
    await delete_counter_keys(client)
    try:
        yield client
    finally:
        await delete_counter_keys(client)
        await client.aclose()


@pytest_asyncio.fixture
async def other() -> AsyncIterator[redis.asyncio.Redis]:
    """Another web process's client."""
    client = redis.asyncio.Redis.from_url(REDIS_URL)
    yield client
    await client.aclose()


Leasing = Callable[..., tuple[LeasedBudgetCounters, CountingRedis]]


@pytest_asyncio.fixture
async def leasing() -> AsyncIterator[Leasing]:
    """Make a web process's leasing counters on a client (closed after the test)."""
    made: list[LeasedBudgetCounters] = []

    def make(
        client: redis.asyncio.Redis, **options: Any
    ) -> tuple[LeasedBudgetCounters, CountingRedis]:
        counting = CountingRedis(client)
        options.setdefault("lease_after", 3)
        options.setdefault("idle_s", IDLE_S)
        made.append(LeasedBudgetCounters(RedisBudgetCounters(counting), **options))
        return made[-1], counting

    yield make
    for counters in made:
        await counters.aclose()


def current_line(budget_id: int, limit_nanos: int) -> BudgetLine:
    """A line of this month: its keys live until the month ends."""
    return line(budget_id, limit_nanos, at=datetime.now(UTC))


async def totals(counters: BudgetCounters, *lines) -> list[tuple[int | None, int]]:
    spends = await counters.spent(lines)
    return [(s.settled_nanos, s.reserved_nanos) for s in spends]


async def make_busy(counters: LeasedBudgetCounters, budget: BudgetLine, requests: int) -> None:
    """Reserve one by one, a little apart, until the counters take a lease."""
    for n in range(requests):
        await counters.reserve(f"busy{n}", [budget], 1_000, 60)
        await asyncio.sleep(0.01)


async def until(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    for _ in range(int(timeout_s / 0.02)):
        if condition():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not reached in time")


# -- the script's lease operations ------------------------------------------------


async def test_a_lease_holds_like_a_request_grows_and_its_refusal_marks_nothing(client) -> None:
    clock = Clock()
    counters = RedisBudgetCounters(client, clock=clock)
    budget = line(1, 1_000)
    await counters.seed(budget, 0)

    assert (await counters.lease("lease:a", [budget], 300, 60)).status is ReserveStatus.RESERVED
    assert (await counters.lease("lease:a", [budget], 300, 60)).status is ReserveStatus.RESERVED
    assert await totals(counters, budget) == [(0, 600)]
    # The lease's room is nobody else's.
    assert (await counters.reserve("r1", [budget], 401, 60)).status is ReserveStatus.EXCEEDED
    refused = await counters.lease("lease:b", [budget], 401, 60)
    assert refused.status is ReserveStatus.EXCEEDED
    (spend,) = await counters.spent([budget])
    assert spend.refused  # by the request r1 ...
    await client.delete(f"{budget.key_prefix}:refused")
    assert (await counters.lease("lease:b", [budget], 401, 60)).status is ReserveStatus.EXCEEDED
    assert not (await counters.spent([budget]))[0].refused  # ... not by a lease


async def test_a_leased_requests_cost_moves_from_the_lease_into_settled_once(client) -> None:
    counters = RedisBudgetCounters(client, clock=Clock())
    budget = line(1, 1_000)
    await counters.seed(budget, 0)
    await counters.lease("lease:a", [budget], 500, 60)

    settled = await counters.settle("r1", [budget], 120, lease_id="lease:a")
    assert settled.applied and settled.released_nanos == 120
    assert await totals(counters, budget) == [(120, 380)]
    assert not (await counters.settle("r1", [budget], 120, lease_id="lease:a")).applied
    assert await totals(counters, budget) == [(120, 380)]
    # A cost beyond what the lease still holds is settled in full; the hold is gone.
    await counters.settle("r2", [budget], 400, lease_id="lease:a")
    assert await totals(counters, budget) == [(520, 0)]
    # The reaper of a dead process finds the request settled, at its cost.
    assert await counters.abandon("r1", [budget.key_prefix]) == 120


async def test_a_returned_lease_releases_its_hold_and_gives_its_units_back(client) -> None:
    clock = Clock()
    counters = RedisBudgetCounters(client, clock=clock)
    budget, bucket = line(1, 1_000), RateBucket("key:1:tokens", 600)
    await counters.seed(budget, 0)
    await counters.lease("lease:a", [budget], 500, 60, [RateCharge(bucket, 200)])
    assert (await counters.rate_levels([bucket]))[0].level == 400

    await counters.settle("r1", [budget], 100, lease_id="lease:a")
    assert await counters.lease_return("lease:a", [budget], [RateCharge(bucket, 150)]) == 400
    assert await totals(counters, budget) == [(100, 0)]
    assert (await counters.rate_levels([bucket]))[0].level == 550
    # Units its requests used beyond their estimates are taken back at return.
    await counters.lease("lease:b", [budget], 0, 60, [RateCharge(bucket, 50)])
    await counters.lease_return("lease:b", [budget], [RateCharge(bucket, -20)])
    assert (await counters.rate_levels([bucket]))[0].level == 550 - 50 - 20


async def test_the_hold_of_a_lease_nobody_returns_expires(client) -> None:
    clock = Clock()
    counters = RedisBudgetCounters(client, clock=clock)
    budget = line(1, 1_000)
    await counters.seed(budget, 0)
    await counters.lease("lease:a", [budget], 500, 60)
    clock.advance(59)
    await counters.lease("lease:a", [budget], 100, 60)  # a grant moves the deadline
    clock.advance(59)
    assert await totals(counters, budget) == [(0, 600)]
    clock.advance(1)
    assert await totals(counters, budget) == [(0, 0)]


# -- leasing counters in a web process ------------------------------------------------


async def test_a_busy_keys_requests_are_admitted_from_its_lease_without_a_reserve(
    client, leasing: Leasing
) -> None:
    counters, sent = leasing(client)
    budget = current_line(1, 1_000_000)
    requests = RateBucket("key:1:requests", 6_000)
    await counters.seed(budget, 0)

    leased = 0
    for n in range(40):
        result = await counters.reserve(f"r{n}", [budget], 1_000, 60, [RateCharge(requests, 1)])
        assert result.admitted
        leased += result.leased
        if result.leased:
            assert result.levels[0].bucket is requests and result.levels[0].level > 0
        await counters.settle(f"r{n}", [budget], 400)
        await asyncio.sleep(0)  # the grant, in the background
    assert leased >= 30
    assert sent.ops["reserve"] == 40 - leased and sent.ops["settle from a lease"] == leased
    assert sent.ops["lease"] >= 1

    # Idle: the lease is given back; what was spent is settled, nothing stays held.
    await until(lambda: counters.leases == 0)
    assert await totals(counters, budget) == [(40 * 400, 0)]
    assert sent.ops["lease_return"] == 1
    level = (await RedisBudgetCounters(client).rate_levels([requests]))[0].level
    assert level > 6_000 - 40 - 5  # its units are back (less the 40 used, refilling)


async def test_processes_leasing_one_hard_budget_never_admit_beyond_it(
    client, other, leasing: Leasing
) -> None:
    budget = current_line(1, 4_000_000)
    tokens = RateBucket("key:1:tokens", 10**9)
    first, _ = leasing(client)
    second, _ = leasing(other)
    await first.seed(budget, 0)
    charged: list[int] = []
    leased = Counter[bool]()
    rng = random.Random(7)

    async def worker(counters: LeasedBudgetCounters, name: str) -> None:
        refusals = 0
        for n in range(2_000):
            amount = rng.randint(1_000, 5_000)
            result = await counters.reserve(
                f"{name}{n}", [budget], amount, 60, [RateCharge(tokens, 10)]
            )
            if not result.admitted:
                assert result.status is ReserveStatus.EXCEEDED
                refusals += 1
                if refusals > 50:
                    return
                await asyncio.sleep(0.001)
                continue
            leased[result.leased] += 1
            await asyncio.sleep(rng.random() / 1000)  # the upstream call
            actual = rng.randint(0, amount)
            await counters.settle(f"{name}{n}", [budget], actual, [RateCharge(tokens, 3)])
            charged.append(actual)

    await asyncio.gather(
        *(worker(c, f"{c_i}-{w}-") for c_i, c in enumerate((first, second)) for w in range(8))
    )
    assert leased[True] > 0 and leased[False] > 0  # both ways were taken
    await until(lambda: first.leases == second.leases == 0)
    ((settled, reserved),) = await totals(first, budget)
    assert settled == sum(charged) <= budget.limit_nanos and reserved == 0
    assert settled > budget.limit_nanos * 0.9  # the room was used, not kept back


async def test_a_lease_admits_no_more_than_it_holds(client, other, leasing: Leasing) -> None:
    counters, _ = leasing(client, idle_s=60)
    budget = current_line(1, 1_000_000)
    await counters.seed(budget, 0)
    await make_busy(counters, budget, 4)  # three reserved one by one, one from the lease
    ((settled, reserved),) = await totals(counters, budget)
    assert reserved > 4 * 1_000  # the lease holds room ahead
    # Another process takes all the room left: the lease cannot grow.
    room = budget.limit_nanos - settled - reserved
    assert (await RedisBudgetCounters(other).reserve("b", [budget], room, 60)).admitted

    results = await asyncio.gather(
        *(counters.reserve(f"a{n}", [budget], 1_000, 60) for n in range(80))
    )
    admitted = 4 + sum(result.admitted for result in results)
    assert 0 < admitted * 1_000 <= reserved  # what the lease held, and no more
    assert {r.status for r in results if not r.admitted} == {ReserveStatus.EXCEEDED}


async def test_near_its_limit_a_budget_is_reserved_request_by_request(
    client, leasing: Leasing
) -> None:
    counters, sent = leasing(client)
    budget = current_line(1, 100_000)  # room for 100 requests: a 16th is not 16 of them
    await counters.seed(budget, 0)
    await counters.seed(budget, 95_000)
    results = [await counters.reserve(f"r{n}", [budget], 1_000, 60) for n in range(8)]
    assert [r.status for r in results] == [ReserveStatus.RESERVED] * 5 + [
        ReserveStatus.EXCEEDED
    ] * 3
    assert sent.ops["reserve"] == 8 and sent.ops["lease"] == 0 and counters.leases == 0
    refused = results[-1].spends[0]
    assert (refused.settled_nanos, refused.reserved_nanos) == (95_000, 5_000)


async def test_a_budget_served_from_leases_is_used_up_to_its_last_request(
    client, leasing: Leasing
) -> None:
    """Leases stop near the limit and give back what they hold unused, so the budget
    refuses only once it is really spent, and nothing is left held."""
    counters, sent = leasing(client, idle_s=60)  # not given back for idling meanwhile
    budget = current_line(1, 1_000 * 1_000)  # exactly 1,000 requests of 1,000
    await counters.seed(budget, 0)
    served = 0
    for n in range(1_100):
        result = await counters.reserve(f"r{n}", [budget], 1_000, 60)
        if not result.admitted:
            break
        served += 1
        await counters.settle(f"r{n}", [budget], 1_000)
        await asyncio.sleep(0)
    assert served == 1_000 and sent.ops["lease"] > 1
    assert result.status is ReserveStatus.EXCEEDED
    ((settled, reserved),) = [(s.settled_nanos, s.reserved_nanos) for s in result.spends]
    assert (settled, reserved) == (budget.limit_nanos, 0)


async def test_a_changed_limit_is_not_served_from_the_old_limits_lease(
    client, leasing: Leasing
) -> None:
    counters, sent = leasing(client)
    budget = current_line(1, 10_000_000)
    await counters.seed(budget, 0)
    await make_busy(counters, budget, 6)
    assert counters.leases == 1 and (await counters.reserve("r6", [budget], 1_000, 60)).leased
    lowered = current_line(1, 500_000)  # the snapshot's new line for the same budget
    result = await counters.reserve("r7", [lowered], 1_000, 60)
    assert result.admitted and not result.leased
    assert sent.ops["reserve"] == 4


async def test_a_lease_whose_settle_fails_admits_nothing_more(client, leasing: Leasing) -> None:
    counters, sent = leasing(client)
    budget = current_line(1, 10_000_000)
    await counters.seed(budget, 0)
    await make_busy(counters, budget, 4)
    assert (await counters.reserve("r4", [budget], 1_000, 60)).leased
    sent.failing.add("settle from a lease")
    with pytest.raises(RedisConnectionError):
        await counters.settle("r4", [budget], 500)
    sent.failing.clear()
    assert not (await counters.reserve("r5", [budget], 1_000, 60)).leased


async def test_closing_gives_every_lease_back(client, leasing: Leasing) -> None:
    counters, _ = leasing(client, idle_s=60)
    budget = current_line(1, 10_000_000)
    await counters.seed(budget, 0)
    for n in range(6):
        await counters.reserve(f"r{n}", [budget], 1_000, 60)
        await counters.settle(f"r{n}", [budget], 700)
        await asyncio.sleep(0.01)
    assert counters.leases == 1
    assert (await totals(counters, budget))[0][1] > 0  # held ahead
    await counters.aclose()
    assert await totals(counters, budget) == [(6 * 700, 0)]
