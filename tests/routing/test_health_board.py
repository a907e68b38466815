"""The health board: replicas post their deployments' health; readers see the fleet merged."""

import os
import time

import orjson
import pytest
import redis
import redis.asyncio

from routing import health_board
from routing.health import CircuitState, DeploymentHealth
from routing.health_board import BOARD_KEY, fleet_statuses, post_local, post_shared

REDIS_URL = os.environ.get("TEST_REDIS_URL") or os.environ.get("REDIS_URL") or ""


def replica_statuses(*, failures: int, in_flight: int) -> list:
    health = DeploymentHealth()
    now = time.monotonic()
    for _ in range(failures):
        health.record_failure(1, now)
    health.record_success(2, now, latency_ms=100)
    for _ in range(in_flight):
        health.started(2, now)
    return health.statuses(now)


def test_the_fleet_view_is_open_if_any_replica_is_open_and_adds_up_in_flight(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(health_board, "_local_board", {})
    monkeypatch.setattr(health_board, "REPLICA_ID", "web-1")
    post_local(replica_statuses(failures=5, in_flight=1))  # opened its breaker
    monkeypatch.setattr(health_board, "REPLICA_ID", "web-2")
    post_local(replica_statuses(failures=1, in_flight=2))
    monkeypatch.setattr(health_board, "REPLICA_ID", "web-3")
    post_local(replica_statuses(failures=0, in_flight=0))
    health_board._local_board["web-3"] = (time.time() - 60, [])  # stopped posting

    fleet = fleet_statuses(None)
    assert fleet[1].state is CircuitState.OPEN and fleet[1].retry_in_s
    assert fleet[1].consecutive_failures == 5 and fleet[1].replicas == 2
    assert fleet[2].state is CircuitState.CLOSED
    assert fleet[2].in_flight == 3 and fleet[2].latency_ms == pytest.approx(100)


@pytest.mark.skipif(not REDIS_URL, reason="needs Redis (REDIS_URL)")
@pytest.mark.asyncio
async def test_posts_through_redis_are_read_back_and_damaged_entries_ignored() -> None:
    client = redis.asyncio.Redis.from_url(REDIS_URL)
    try:
        await client.delete(BOARD_KEY)
        await post_shared(client, replica_statuses(failures=5, in_flight=0))
        await client.hset(BOARD_KEY, "intruder", b"not json")
        stale = {"at": time.time() - 60, "statuses": [{"deployment_id": 9}]}
        await client.hset(BOARD_KEY, "gone", orjson.dumps(stale))
        fleet = fleet_statuses(REDIS_URL)
        assert set(fleet) == {1, 2}
        assert fleet[1].state is CircuitState.OPEN
    finally:
        await client.delete(BOARD_KEY)
        await client.aclose()


def test_an_unreachable_redis_is_an_error_the_caller_handles() -> None:
    with pytest.raises(redis.RedisError):
        fleet_statuses("redis://127.0.0.1:1/0")
