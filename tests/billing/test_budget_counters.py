"""Budget counters: one contract, run against Redis and the in-process default.

Reserve holds a request's maximum cost on every budget line at once or not at
all; settle records the actual cost and releases the hold; holds of crashed
requests expire; lost counters are reported missing until seeded.
"""

import asyncio
import json
import random
import sys
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest
import pytest_asyncio

from billing.budget_counters import (
    KEY_GRACE_S,
    RateBucket,
    RateCharge,
    ReserveResult,
    ReserveStatus,
)
from tests.support.budgets import HARNESS_KINDS, REDIS_URL, Harness, budget_harness, line

pytestmark = pytest.mark.asyncio

USD = 10**9


@pytest_asyncio.fixture(params=HARNESS_KINDS)
async def harness(request: pytest.FixtureRequest) -> AsyncIterator[Harness]:
    async with budget_harness(request.param) as built:
        yield built


async def seed_zero(harness: Harness, *lines) -> None:
    for each in lines:
        await harness.counters.seed(each, 0)


async def totals(harness: Harness, *lines) -> list[tuple[int | None, int]]:
    return [(s.settled_nanos, s.reserved_nanos) for s in await harness.counters.spent(lines)]


async def test_a_missing_counter_reserves_nothing_until_it_is_seeded(harness: Harness) -> None:
    org, key = line(1, 10 * USD), line(2, USD)
    await harness.counters.seed(org, 0)

    result = await harness.counters.reserve("r1", [org, key], 100, ttl_s=60)
    assert result.status is ReserveStatus.MISSING and not result.admitted
    assert result.missing == (key,)
    assert await totals(harness, org, key) == [(0, 0), (None, 0)]  # zero is not missing

    assert await harness.counters.seed(key, 300) == 300
    assert (await harness.counters.reserve("r1", [org, key], 100, ttl_s=60)).admitted
    assert await totals(harness, org, key) == [(0, 100), (300, 100)]


async def test_a_hard_limit_refuses_what_does_not_fit_and_then_nothing_is_held(
    harness: Harness,
) -> None:
    org, key = line(1, 1_000), line(2, 100)
    await seed_zero(harness, org, key)
    await harness.counters.seed(key, 30)

    refused = await harness.counters.reserve("r1", [org, key], 71, ttl_s=60)
    assert refused.status is ReserveStatus.EXCEEDED
    assert [(s.line, s.settled_nanos, s.reserved_nanos) for s in refused.spends] == [(key, 30, 0)]
    assert await totals(harness, org, key) == [(0, 0), (30, 0)]

    fits = await harness.counters.reserve("r2", [org, key], 70, ttl_s=60)  # exactly the limit
    assert fits.status is ReserveStatus.RESERVED
    assert [(s.settled_nanos, s.reserved_nanos) for s in fits.spends] == [(0, 70), (30, 70)]
    assert not (await harness.other.reserve("r3", [org, key], 1, ttl_s=60)).admitted


async def test_every_exhausted_hard_budget_is_named(harness: Harness) -> None:
    team, key = line(1, 50), line(2, 40)
    await seed_zero(harness, team, key)
    result = await harness.counters.reserve("r1", [team, key], 60, ttl_s=60)
    assert [s.line.budget_id for s in result.spends] == [1, 2]
    assert result.spends[0].line.window.end_at == datetime(2025, 7, 1, tzinfo=UTC)


async def test_a_soft_limit_never_refuses(harness: Harness) -> None:
    soft = line(1, 100, hard=False)
    await seed_zero(harness, soft)
    assert (await harness.counters.reserve("r1", [soft], 500, ttl_s=60)).admitted
    assert (await harness.counters.reserve("r2", [soft], 500, ttl_s=60)).admitted
    assert await totals(harness, soft) == [(0, 1_000)]


async def test_settling_records_the_actual_cost_and_frees_the_rest(harness: Harness) -> None:
    budget = line(1, 100)
    await seed_zero(harness, budget)
    await harness.counters.reserve("r1", [budget], 100, ttl_s=60)
    assert not (await harness.counters.reserve("r2", [budget], 1, ttl_s=60)).admitted

    settled = await harness.other.settle("r1", [budget], 30)
    assert settled.applied and settled.released_nanos == 100 and not settled.missing
    assert await totals(harness, budget) == [(30, 0)]
    assert (await harness.counters.reserve("r2", [budget], 70, ttl_s=60)).admitted


async def test_a_cost_above_the_reservation_is_recorded_in_full(harness: Harness) -> None:
    budget = line(1, 1_000)
    await seed_zero(harness, budget)
    await harness.counters.reserve("r1", [budget], 100, ttl_s=60)
    await harness.counters.settle("r1", [budget], 250)
    assert await totals(harness, budget) == [(250, 0)]


async def test_settling_twice_changes_nothing(harness: Harness) -> None:
    budget = line(1, 1_000)
    await seed_zero(harness, budget)
    await harness.counters.reserve("r1", [budget], 100, ttl_s=60)
    assert (await harness.counters.settle("r1", [budget], 40)).applied
    again = await harness.other.settle("r1", [budget], 40)
    assert not again.applied
    assert await totals(harness, budget) == [(40, 0)]


async def test_reserving_twice_for_one_request_holds_once(harness: Harness) -> None:
    budget = line(1, 1_000)
    await seed_zero(harness, budget)
    await harness.counters.reserve("r1", [budget], 100, ttl_s=60)
    again = await harness.other.reserve("r1", [budget], 100, ttl_s=60)
    assert again.status is ReserveStatus.ALREADY_HELD and again.admitted
    assert await totals(harness, budget) == [(0, 100)]


async def test_settling_an_unknown_reservation_records_the_cost_on_the_given_lines(
    harness: Harness,
) -> None:
    org, key = line(1, 1_000), line(2, 1_000)
    await seed_zero(harness, org, key)
    result = await harness.counters.settle("never-reserved", [org, key], 55)
    assert result.applied and result.released_nanos == 0
    assert await totals(harness, org, key) == [(55, 0), (55, 0)]


async def test_settling_on_a_missing_counter_does_not_create_it(harness: Harness) -> None:
    org, key = line(1, 1_000), line(2, 1_000)
    await seed_zero(harness, org, key)
    await harness.counters.reserve("r1", [org, key], 100, ttl_s=60)
    await harness.lose_counters()
    await harness.counters.seed(org, 0)

    result = await harness.counters.settle("r1", [org, key], 60)
    assert result.missing == (key,)
    # A counter holding only this cost would pass for the whole period's spend.
    assert await totals(harness, org, key) == [(60, 0), (None, 0)]


async def test_a_crashed_requests_hold_expires_and_a_late_settle_still_counts(
    harness: Harness,
) -> None:
    budget = line(1, 100)
    await seed_zero(harness, budget)
    await harness.counters.reserve("crashed", [budget], 100, ttl_s=30)

    harness.clock.advance(29)
    assert not (await harness.other.reserve("r2", [budget], 10, ttl_s=30)).admitted
    harness.clock.advance(1)  # the hold's deadline
    assert (await harness.other.reserve("r2", [budget], 10, ttl_s=30)).admitted
    assert await totals(harness, budget) == [(0, 10)]

    late = await harness.counters.settle("crashed", [budget], 25)
    assert late.applied and late.released_nanos == 0
    assert await totals(harness, budget) == [(25, 10)]  # r2's hold is untouched


async def test_expired_holds_show_as_released_in_reports(harness: Harness) -> None:
    budget = line(1, 100)
    await seed_zero(harness, budget)
    await harness.counters.reserve("crashed", [budget], 60, ttl_s=5)
    harness.clock.advance(5)
    assert await totals(harness, budget) == [(0, 0)]


async def test_seeding_never_lowers_a_counter(harness: Harness) -> None:
    budget = line(1, 1_000)
    assert await harness.counters.seed(budget, 500) == 500
    assert await harness.other.seed(budget, 300) == 500
    assert await harness.counters.seed(budget, 700) == 700
    assert await totals(harness, budget) == [(700, 0)]


async def test_lost_counters_are_missing_until_seeded_and_then_honour_the_seed(
    harness: Harness,
) -> None:
    budget = line(1, 1_000)
    await seed_zero(harness, budget)
    await harness.counters.reserve("r1", [budget], 900, ttl_s=60)
    await harness.counters.settle("r1", [budget], 900)

    await harness.lose_counters()
    lost = await harness.counters.reserve("r2", [budget], 200, ttl_s=60)
    assert lost.status is ReserveStatus.MISSING and lost.missing == (budget,)

    await harness.counters.seed(budget, 900)  # what the ledger says (see test_budget_ledger)
    assert not (await harness.counters.reserve("r2", [budget], 200, ttl_s=60)).admitted
    assert (await harness.counters.reserve("r2", [budget], 100, ttl_s=60)).admitted


async def test_spend_resets_exactly_at_the_orgs_local_midnight(harness: Harness) -> None:
    midnight = datetime(2025, 6, 15, 22, tzinfo=UTC)  # 2025-06-16 00:00 in Berlin

    def daily(at: datetime):
        return line(7, 100, period="daily", time_zone="Europe/Berlin", at=at)

    last_moment = daily(midnight - timedelta(microseconds=1))
    await seed_zero(harness, last_moment)
    await harness.counters.reserve("r1", [last_moment], 100, ttl_s=60)
    await harness.counters.settle("r1", [last_moment], 100)
    assert not (await harness.counters.reserve("r2", [last_moment], 1, ttl_s=60)).admitted

    next_day = daily(midnight)
    assert next_day.period_id == "d2025-06-16" != last_moment.period_id
    assert (await harness.counters.reserve("r2", [next_day], 1, ttl_s=60)).missing
    await harness.counters.seed(next_day, 0)  # the ledger has nothing in the new day yet
    assert (await harness.counters.reserve("r2", [next_day], 100, ttl_s=60)).admitted
    assert await totals(harness, last_moment, next_day) == [(100, 0), (0, 100)]


async def test_counters_are_forgotten_a_little_after_their_period_ends(harness: Harness) -> None:
    monthly, lifetime = line(1, 100), line(2, 100, period="lifetime")
    await harness.counters.seed(monthly, 10)
    await harness.counters.seed(lifetime, 10)
    keep_s = datetime(2025, 7, 1, tzinfo=UTC).timestamp() + KEY_GRACE_S - harness.clock.now
    if harness.client is not None:  # Redis expires keys on its own clock
        ttl_ms = await harness.client.pttl(f"{monthly.key_prefix}:settled")
        assert keep_s * 1000 - 5_000 < ttl_ms <= keep_s * 1000
        assert await harness.client.pttl(f"{lifetime.key_prefix}:settled") == -1
        return
    harness.clock.advance(keep_s - 1)
    assert await totals(harness, monthly, lifetime) == [(10, 0), (10, 0)]
    harness.clock.advance(1)
    assert await totals(harness, monthly, lifetime) == [(None, 0), (10, 0)]


async def test_amounts_beyond_exact_integer_range_are_refused(harness: Harness) -> None:
    with pytest.raises(ValueError):
        line(1, 2**53)
    with pytest.raises(ValueError):
        await harness.counters.reserve("r1", [line(1, 100)], -1, ttl_s=60)


async def test_reservation_never_overspends_under_concurrency(harness: Harness) -> None:
    """200 requests at once from two processes against a hard budget that fits only some.

    Every refusal is checked against the totals the counters saw at that moment:
    a request is refused only if it did not fit then.
    """
    limit = 300 * 10**6
    key, org = line(1, limit), line(2, 10 * USD, hard=False)
    await seed_zero(harness, key, org)
    rng = random.Random(20250615)
    plans = []
    for number in range(200):
        max_cost = rng.randint(1, 10) * 10**6
        plans.append((f"req-{number}", max_cost, rng.randint(0, max_cost), rng.random() / 50))

    async def one(number: int, request_id: str, max_cost: int, actual: int, pause_s: float):
        counters = harness.counters if number % 2 else harness.other
        await asyncio.sleep(pause_s)
        result = await counters.reserve(request_id, [key, org], max_cost, ttl_s=60)
        if result.admitted:
            await asyncio.sleep(pause_s)  # the upstream call
            await counters.settle(request_id, [key, org], actual)
        return result

    results: list[ReserveResult] = await asyncio.gather(
        *(one(number, *plan) for number, plan in enumerate(plans))
    )

    admitted = [plan for plan, result in zip(plans, results, strict=True) if result.admitted]
    assert 0 < len(admitted) < len(plans)
    spent_total = sum(actual for _, _, actual, _ in admitted)
    assert await totals(harness, key, org) == [(spent_total, 0), (spent_total, 0)]
    assert spent_total <= limit
    for (_, max_cost, _, _), result in zip(plans, results, strict=True):
        if result.admitted:
            (key_after, _) = result.spends
            assert key_after.settled_nanos + key_after.reserved_nanos <= limit
        else:
            assert result.status is ReserveStatus.EXCEEDED
            (key_then,) = result.spends  # the soft org budget never refuses
            assert key_then.line == key
            assert key_then.settled_nanos + key_then.reserved_nanos + max_cost > limit


# Rate buckets: taken in the same operation as the budgets.


async def test_a_request_bucket_admits_its_capacity_then_refills_continuously(
    harness: Harness,
) -> None:
    per_minute = RateBucket("key:1:requests", 6)  # one back every 10 s
    taken = [
        await harness.counters.reserve(
            f"r{i}", [], 0, ttl_s=60, charges=[RateCharge(per_minute, 1)]
        )
        for i in range(6)
    ]
    assert [result.levels[0].remaining for result in taken] == [5, 4, 3, 2, 1, 0]
    assert taken[-1].levels[0].full_in_s == pytest.approx(60)

    refused = await harness.other.reserve(
        "r6", [], 0, ttl_s=60, charges=[RateCharge(per_minute, 1)]
    )
    assert refused.status is ReserveStatus.RATE_LIMITED and not refused.admitted
    assert refused.levels[0].wait_s == pytest.approx(10)

    harness.clock.advance(9.9)
    assert not (
        await harness.counters.reserve("r7", [], 0, 60, [RateCharge(per_minute, 1)])
    ).admitted
    harness.clock.advance(0.1)
    assert (await harness.counters.reserve("r8", [], 0, 60, [RateCharge(per_minute, 1)])).admitted
    harness.clock.advance(3600)  # a bucket never holds more than its capacity
    (level,) = await harness.other.rate_levels([per_minute])
    assert level.remaining == 6 and level.full_in_s == 0


async def test_a_short_bucket_refuses_and_then_nothing_is_held_or_taken(harness: Harness) -> None:
    budget = line(1, 1_000)
    await seed_zero(harness, budget)
    requests = RateBucket("team:1:requests", 100)
    tokens = RateBucket("team:1:tokens", 50)
    charges = [RateCharge(requests, 1), RateCharge(tokens, 40)]
    assert (await harness.counters.reserve("r1", [budget], 10, 60, charges)).admitted
    refused = await harness.counters.reserve("r2", [budget], 10, 60, charges)
    assert refused.status is ReserveStatus.RATE_LIMITED
    assert [(level.bucket, level.amount) for level in refused.levels] == [(tokens, 40)]
    assert await totals(harness, budget) == [(0, 10)]  # only r1's hold
    levels = await harness.counters.rate_levels([requests, tokens])
    assert [level.remaining for level in levels] == [99, 10]


async def test_a_budget_refusal_takes_nothing_from_the_buckets(harness: Harness) -> None:
    budget = line(1, 100)
    await seed_zero(harness, budget)
    requests = RateBucket("key:2:requests", 10)
    refused = await harness.counters.reserve("r1", [budget], 101, 60, [RateCharge(requests, 1)])
    assert refused.status is ReserveStatus.EXCEEDED
    (level,) = await harness.counters.rate_levels([requests])
    assert level.remaining == 10


async def test_settling_gives_back_unused_tokens_and_takes_an_overrun(harness: Harness) -> None:
    tokens = RateBucket("org:1:tokens", 1_000)
    await harness.counters.reserve("r1", [], 0, 60, [RateCharge(tokens, 300)])
    await harness.counters.reserve("r2", [], 0, 60, [RateCharge(tokens, 300)])
    await harness.other.settle("r1", [], 0, refunds=[RateCharge(tokens, 300 - 120)])
    await harness.other.settle("r1", [], 0, refunds=[RateCharge(tokens, 180)])  # once only
    (level,) = await harness.counters.rate_levels([tokens])
    assert level.remaining == 1_000 - 120 - 300
    await harness.other.settle("r2", [], 0, refunds=[RateCharge(tokens, 300 - 900)])
    (level,) = await harness.counters.rate_levels([tokens])
    assert level.level == pytest.approx(1_000 - 120 - 900)  # used more than estimated


async def test_voiding_a_reserve_that_ran_releases_its_hold_and_gives_its_tokens_back(
    harness: Harness,
) -> None:
    budget = line(1, 1_000)
    await seed_zero(harness, budget)
    tokens = RateBucket("key:3:tokens", 100)
    charges = [RateCharge(tokens, 40)]
    assert (await harness.counters.reserve("late", [budget], 600, 60, charges)).admitted
    await harness.other.void("late", [budget], charges)
    await harness.other.void("late", [budget], charges)  # idempotent
    assert await totals(harness, budget) == [(0, 0)]
    (level,) = await harness.counters.rate_levels([tokens])
    assert level.remaining == 100
    # The budget has its room back: a request needing most of it fits.
    assert (await harness.counters.reserve("next", [budget], 1_000, 60, charges)).admitted


async def test_a_reserve_that_arrives_after_its_void_takes_nothing(harness: Harness) -> None:
    """A frozen Redis runs a reserve its caller gave up on once it resumes: if the void
    got there first, the reserve must not hold the budget or take rate tokens."""
    budget = line(1, 1_000)
    await seed_zero(harness, budget)
    tokens = RateBucket("key:4:tokens", 100)
    charges = [RateCharge(tokens, 40)]
    await harness.other.void("late", [budget], charges)
    result = await harness.counters.reserve("late", [budget], 600, 60, charges)
    assert result.status is ReserveStatus.VOIDED and not result.admitted
    assert await totals(harness, budget) == [(0, 0)]
    (level,) = await harness.counters.rate_levels([tokens])
    assert level.remaining == 100  # nothing taken, and nothing given that was not taken


async def test_a_refusing_line_remembers_it_for_its_period(harness: Harness) -> None:
    hard, soft = line(1, 100), line(2, 100, hard=False)
    await seed_zero(harness, hard, soft)
    assert [spend.refused for spend in await harness.counters.spent([hard, soft])] == [False, False]
    await harness.counters.reserve("r1", [hard, soft], 500, ttl_s=60)
    assert [spend.refused for spend in await harness.other.spent([hard, soft])] == [True, False]
    next_month = line(1, 100, at=datetime(2025, 7, 1, tzinfo=UTC))
    await seed_zero(harness, next_month)
    assert not (await harness.counters.spent([next_month]))[0].refused


async def test_counters_keep_working_after_redis_forgets_the_script(harness: Harness) -> None:
    if harness.client is None:
        pytest.skip("Redis only: a restarted Redis has no scripts cached")
    limited = line(41, 10 * USD)
    await seed_zero(harness, limited)
    await harness.client.script_flush()  # as after a Redis restart or failover

    result = await harness.counters.reserve("after-flush", [limited], 2 * USD, ttl_s=60)

    assert result.status == ReserveStatus.RESERVED
    assert await totals(harness, limited) == [(0, 2 * USD)]


# Pings Redis until its stdin closes, then prints (sent at, waited) of each ping: in a
# process of its own, so the reading test's own pauses (parsing, GC) are not counted.
PINGER = """
import json, sys, threading, time, redis
client = redis.Redis.from_url(sys.argv[1])
client.ping()
done = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), done.set()), daemon=True).start()
print("ready", flush=True)
pings = []
while not done.is_set():
    sent = time.time()
    client.ping()
    pings.append((sent, time.time() - sent))
    time.sleep(0.001)
print(json.dumps(pings), flush=True)
"""


async def test_reading_every_budget_keeps_redis_answering_everyone_else(harness: Harness) -> None:
    """Alerts and the dashboard read the standing of every budget at once. Redis runs a
    script alone, so one call over tens of thousands of lines would hold up every
    proxy's reserves meanwhile: the lines are read a few hundred per call."""
    if harness.client is None:
        pytest.skip("the in-process counters hold up no one")
    lines = [line(budget_id, USD) for budget_id in range(1, 20_001)]
    await harness.counters.seed(lines[0], 5)
    await harness.counters.seed(lines[-1], 7)
    pinger = await asyncio.create_subprocess_exec(
        sys.executable, "-c", PINGER, REDIS_URL,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert pinger.stdout is not None and await pinger.stdout.readline() == b"ready\n"
    started = time.time()
    spends = await harness.counters.spent(lines)
    ended = time.time()
    output, _ = await asyncio.wait_for(pinger.communicate(b""), timeout=30)
    waits = [waited for sent, waited in json.loads(output) if started <= sent <= ended]

    assert [s.line for s in spends] == lines
    assert (spends[0].settled_nanos, spends[-1].settled_nanos) == (5, 7)
    assert {s.settled_nanos for s in spends[1:-1]} == {None}
    took = ended - started
    assert len(waits) > 5, "Redis answered nobody else while the budgets were read"
    assert max(waits) < took / 3, f"a ping waited {max(waits):.3f} s of the read's {took:.3f} s"
