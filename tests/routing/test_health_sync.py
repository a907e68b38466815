"""Circuit state shared between replicas through the run's Redis (its `test:health` keys
are deleted around each test).

Each replica is a `DeploymentHealth` with its own `SharedHealth`, its own monotonic clock
(replicas' monotonic clocks are not comparable, so they start far apart here) and its own
wall clock, which `CLOCKS` sets five minutes either side of the real one: sharing runs on
Redis's clock, so it must work whatever the replicas' clocks say.
"""

import logging
import time
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
import redis.asyncio
from django.conf import settings

from routing.health import BreakerPolicy, CircuitState, DeploymentHealth
from routing.health_sync import SharedHealth

DEAD_REDIS_URL = "redis://127.0.0.1:1/0"
PREFIX = "test:health"
DEP = 42
POLICY = BreakerPolicy(consecutive_failures=3, error_rate=0.5, min_requests=10, cooldown_s=30)
SKEW_S = 300.0
# Replica A's and B's wall clocks against the real one: each test below holds for all three.
CLOCKS = pytest.mark.parametrize(
    "skews",
    [(0.0, 0.0), (-SKEW_S, SKEW_S), (SKEW_S, -SKEW_S)],
    ids=["same clock", "A 5 min slow, B 5 min fast", "A 5 min fast, B 5 min slow"],
)

pytestmark = pytest.mark.asyncio


class Replica:
    """One web process: its health, its sync, its own monotonic clock and its wall clock's
    offset from the real one."""

    def __init__(
        self, client: redis.asyncio.Redis, clock: float, policy: BreakerPolicy, skew_s: float = 0
    ) -> None:
        self.health = DeploymentHealth(policy)
        self.shared = SharedHealth(
            client, key_prefix=PREFIX, policy=policy, wall_clock=lambda: time.time() + skew_s
        )
        self.now = clock

    async def sync(self) -> None:
        await self.shared.sync(self.health, self.now)

    def allow(self, deployment_id: int = DEP) -> bool:
        return self.health.allow(deployment_id, self.now)

    def state(self, deployment_id: int = DEP) -> CircuitState:
        return self.health.status(deployment_id, self.now).state

    def fail(self, times: int, deployment_id: int = DEP) -> None:
        for _ in range(times):
            self.health.record_failure(deployment_id, self.now)


async def forget_test_keys(connection: redis.asyncio.Redis) -> None:
    keys = [key async for key in connection.scan_iter(match=f"{PREFIX}:*")]
    if keys:
        await connection.delete(*keys)


@pytest_asyncio.fixture
async def client() -> AsyncIterator[redis.asyncio.Redis]:
    if not settings.REDIS_URL:
        pytest.skip("sharing circuit state needs Redis (REDIS_URL is unset)")
    connection = redis.asyncio.Redis.from_url(settings.REDIS_URL)
    await forget_test_keys(connection)
    try:
        yield connection
    finally:
        await forget_test_keys(connection)
        await connection.aclose()


async def replicas(
    client: redis.asyncio.Redis,
    policy: BreakerPolicy = POLICY,
    skews: tuple[float, float] = (0.0, 0.0),
) -> tuple[Replica, Replica]:
    return Replica(client, 1_000.0, policy, skews[0]), Replica(client, 777_000.0, policy, skews[1])


async def sync_round(*fleet: Replica) -> None:
    for replica in fleet:
        await replica.sync()


@CLOCKS
async def test_a_breaker_one_replica_opens_is_refused_by_the_other_after_one_round(
    client: redis.asyncio.Redis, skews: tuple[float, float]
) -> None:
    a, b = await replicas(client, skews=skews)
    a.fail(POLICY.consecutive_failures)
    assert not a.allow()
    assert b.allow(), "before any sync, B knows nothing"
    await sync_round(a, b)
    assert not b.allow(), "B never called the deployment and still refuses it"
    assert b.state() is CircuitState.OPEN
    assert b.allow(DEP + 1), "other deployments are unaffected"


@CLOCKS
async def test_a_probe_that_succeeds_after_the_cooldown_closes_the_breaker_everywhere(
    client: redis.asyncio.Redis, skews: tuple[float, float]
) -> None:
    a, b = await replicas(client, skews=skews)
    a.fail(POLICY.consecutive_failures)
    await sync_round(a, b)
    b.now += 10
    assert not b.allow(), "the adopted cooldown is A's, not a fresh one"
    a.now += POLICY.cooldown_s + 1
    b.now += POLICY.cooldown_s - 10 + 1
    assert b.allow(), "B's probe"
    assert not b.allow(), "one probe at a time"
    b.health.record_success(DEP, b.now, latency_ms=120)
    assert b.state() is CircuitState.CLOSED
    await sync_round(b, a)
    assert a.state() is CircuitState.CLOSED
    assert a.allow() and a.allow(), "A is closed, not half-open with a single probe"
    assert b.state() is CircuitState.CLOSED
    a.fail(1)
    await sync_round(a, b, a, b)
    assert a.allow() and b.allow(), "the failures from before the probe no longer count"


@CLOCKS
async def test_a_failed_probe_reopens_the_breaker_everywhere(
    client: redis.asyncio.Redis, skews: tuple[float, float]
) -> None:
    a, b = await replicas(client, skews=skews)
    b.health.record_success(DEP, b.now, latency_ms=100)
    a.fail(POLICY.consecutive_failures)
    await sync_round(a, b)
    a.now += POLICY.cooldown_s + 1
    b.now += POLICY.cooldown_s + 1
    assert a.allow()
    a.fail(1)
    await sync_round(a, b)
    assert not b.allow(), "B adopts A's fresh cooldown instead of probing"
    b.now += POLICY.cooldown_s - 1
    assert not b.allow()
    b.now += 1.5
    assert b.allow()


@CLOCKS
async def test_an_adopted_cooldown_ends_when_the_openers_does(
    client: redis.asyncio.Redis, skews: tuple[float, float]
) -> None:
    a, b = await replicas(client, skews=skews)
    await sync_round(a, b)  # the offset to Redis's clock now comes from a sync's pipeline
    a.fail(POLICY.consecutive_failures)
    a.now += 10
    await sync_round(a, b)
    b.now += POLICY.cooldown_s - 10 - 0.5
    assert not b.allow(), "B refuses until A's cooldown is over"
    b.now += 1
    assert b.allow(), "and no longer: B probes when A does"


@CLOCKS
async def test_failures_split_across_replicas_open_the_breaker_fleet_wide(
    client: redis.asyncio.Redis, skews: tuple[float, float]
) -> None:
    policy = BreakerPolicy(consecutive_failures=100, error_rate=0.5, min_requests=10)
    a, b = await replicas(client, policy, skews)
    for replica in (a, b):  # 6 calls, 4 failures each: locally below min_requests
        for call in range(6):
            if call < 4:
                replica.fail(1)
            else:
                replica.health.record_success(DEP, replica.now, latency_ms=100)
    assert a.allow() and b.allow()
    await sync_round(a, b, a)
    assert not a.allow() and not b.allow(), "12 calls, 8 failed, across the fleet"
    assert b.health.status(DEP, b.now).window_requests == 12


@CLOCKS
async def test_a_low_error_rate_split_across_replicas_keeps_the_breaker_closed(
    client: redis.asyncio.Redis, skews: tuple[float, float]
) -> None:
    policy = BreakerPolicy(consecutive_failures=100, error_rate=0.5, min_requests=10)
    a, b = await replicas(client, policy, skews)
    for replica in (a, b):
        replica.fail(2)
        for _ in range(6):
            replica.health.record_success(DEP, replica.now, latency_ms=100)
    await sync_round(a, b, a, b)
    assert a.allow() and b.allow()
    assert a.health.status(DEP, a.now).window_requests == 16
    assert b.health.status(DEP, b.now).window_failures == 4


async def test_replicas_with_another_key_prefix_are_another_fleet(
    client: redis.asyncio.Redis,
) -> None:
    a, _ = await replicas(client)
    stranger = DeploymentHealth(POLICY)
    a.fail(POLICY.consecutive_failures)
    await a.sync()
    await SharedHealth(client, key_prefix="test:elsewhere", policy=POLICY).sync(stranger, 5.0)
    assert stranger.allow(DEP, 5.0)


async def test_a_dead_redis_logs_a_warning_and_keeps_the_local_breaker(
    caplog: pytest.LogCaptureFixture,
) -> None:
    dead = redis.asyncio.Redis.from_url(DEAD_REDIS_URL, socket_connect_timeout=0.5)
    try:
        replica = Replica(dead, 1_000.0, POLICY)
        replica.fail(POLICY.consecutive_failures)
        with caplog.at_level(logging.WARNING, logger="routing.health_sync"):
            await replica.sync()
            await replica.sync()
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1, "one warning per outage, not one per sync"
        assert "per process" in warnings[0].getMessage()
        assert not replica.allow()
        replica.now += POLICY.cooldown_s
        assert replica.allow(), "the local breaker still goes half-open on its own"
    finally:
        await dead.aclose()


async def test_a_breaker_opened_while_redis_was_down_is_published_once_it_is_back(
    client: redis.asyncio.Redis,
) -> None:
    dead = redis.asyncio.Redis.from_url(DEAD_REDIS_URL, socket_connect_timeout=0.5)
    try:
        a, b = await replicas(client)
        a.shared._redis = dead  # the same process, Redis down for a moment
        a.fail(POLICY.consecutive_failures)
        await a.sync()
        a.shared._redis = client
        a.now += 5
        await sync_round(a, b)
        assert not b.allow()
        b.now += POLICY.cooldown_s - 5 + 0.5
        assert b.allow(), "the cooldown left is what remained of A's"
    finally:
        await dead.aclose()


@CLOCKS
async def test_minute_usage_is_shared_so_limits_hold_for_the_fleet(
    client: redis.asyncio.Redis, skews: tuple[float, float]
) -> None:
    a, b = await replicas(client, skews=skews)
    for _ in range(4):
        a.health.started(DEP, a.now)
        a.health.finished(DEP)
    a.health.record_tokens(DEP, 1_000, a.now)
    b.health.started(DEP, b.now)
    b.health.finished(DEP)
    await sync_round(a, b, a)
    assert b.health.minute_usage(DEP, b.now) == (5, 1_000), "B sees A's four and its own"
    assert a.health.minute_usage(DEP, a.now) == (5, 1_000), "A does not count itself twice"
    await sync_round(a, b)
    assert a.health.minute_usage(DEP, a.now) == (5, 1_000), "a quiet round adds nothing"
