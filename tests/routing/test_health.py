"""Per-deployment circuit breakers, decayed latency and in-flight counts, on a controlled clock."""

import tracemalloc

import pytest

from routing.health import BreakerPolicy, CircuitState, DeploymentHealth, DeploymentStatus

DEP = 7
OTHER = 8
T0 = 1_000.0  # monotonic clocks start anywhere


def failing(health: DeploymentHealth, deployment_id: int, now: float, times: int) -> None:
    for _ in range(times):
        health.record_failure(deployment_id, now)


def opened(policy: BreakerPolicy | None = None) -> DeploymentHealth:
    health = DeploymentHealth(policy or BreakerPolicy())
    failing(health, DEP, T0, health.policy.consecutive_failures)
    assert not health.allow(DEP, T0)
    return health


def test_an_unknown_deployment_is_healthy_with_no_data() -> None:
    health = DeploymentHealth()
    assert health.allow(DEP, T0)
    assert health.latency_ms(DEP) is None
    assert health.ttft_ms(DEP) is None
    assert health.in_flight(DEP) == 0
    assert health.status(DEP, T0) == DeploymentStatus(
        deployment_id=DEP,
        state=CircuitState.CLOSED,
        consecutive_failures=0,
        window_requests=0,
        window_failures=0,
        latency_ms=None,
        ttft_ms=None,
        in_flight=0,
        opened_at=None,
    )
    assert health.statuses(T0) == []


def test_opens_after_the_configured_number_of_consecutive_failures() -> None:
    health = DeploymentHealth(BreakerPolicy(consecutive_failures=5))
    failing(health, DEP, T0, 4)
    assert health.allow(DEP, T0)
    health.record_failure(DEP, T0 + 1)
    assert not health.allow(DEP, T0 + 1)
    status = health.status(DEP, T0 + 1)
    assert status.state is CircuitState.OPEN
    assert status.opened_at == T0 + 1
    assert health.allow(OTHER, T0 + 1), "one deployment's breaker never affects another"


def test_a_success_resets_the_consecutive_failure_count() -> None:
    health = DeploymentHealth(BreakerPolicy(consecutive_failures=3, min_requests=1000))
    for second in range(10):
        failing(health, DEP, T0 + second, 2)
        health.record_success(DEP, T0 + second, latency_ms=100)
    assert health.allow(DEP, T0 + 10)
    assert health.status(DEP, T0 + 10).consecutive_failures == 0


def test_opens_when_the_error_rate_over_the_window_reaches_the_threshold() -> None:
    policy = BreakerPolicy(consecutive_failures=100, error_rate=0.5, min_requests=10)
    health = DeploymentHealth(policy)
    for call in range(9):  # alternating: never two failures in a row
        now = T0 + call
        if call % 2:
            health.record_failure(DEP, now)
        else:
            health.record_success(DEP, now, latency_ms=50)
    assert health.allow(DEP, T0 + 9), "9 calls are below min_requests"
    health.record_failure(DEP, T0 + 9)  # 10 calls, 5 failures: 50%
    assert not health.allow(DEP, T0 + 9)
    status = health.status(DEP, T0 + 9)
    assert (status.window_requests, status.window_failures) == (10, 5)


def test_a_high_error_rate_below_min_requests_keeps_the_breaker_closed() -> None:
    health = DeploymentHealth(BreakerPolicy(consecutive_failures=100, min_requests=10))
    failing(health, DEP, T0, 9)
    assert health.allow(DEP, T0)
    assert health.status(DEP, T0).state is CircuitState.CLOSED


def test_an_error_rate_under_the_threshold_keeps_the_breaker_closed() -> None:
    health = DeploymentHealth(BreakerPolicy(consecutive_failures=100, error_rate=0.5))
    for call in range(100):  # 40% failures
        if call % 5 < 2:
            health.record_failure(DEP, T0 + call * 0.5)
        else:
            health.record_success(DEP, T0 + call * 0.5, latency_ms=50)
    assert health.allow(DEP, T0 + 50)


def test_failures_spread_beyond_the_window_keep_the_breaker_closed() -> None:
    policy = BreakerPolicy(consecutive_failures=1000, min_requests=10, window_s=60)
    health = DeploymentHealth(policy)
    # A failure every 7 s for an hour: 514 failures, never 10 inside one window.
    for call in range(514):
        health.record_failure(DEP, T0 + call * 7.0)
    assert health.allow(DEP, T0 + 3600)
    assert health.status(DEP, T0 + 3600).window_requests <= 10


def test_an_open_breaker_refuses_until_the_cooldown_then_admits_exactly_one_probe() -> None:
    health = opened(BreakerPolicy(cooldown_s=30))
    assert not health.allow(DEP, T0 + 29.9)
    assert health.allow(DEP, T0 + 30), "the cooldown is over: one probe"
    assert health.status(DEP, T0 + 30).state is CircuitState.HALF_OPEN
    assert not health.allow(DEP, T0 + 30)
    assert not health.allow(DEP, T0 + 45), "still only one probe while it is in flight"


def test_a_successful_probe_closes_the_breaker_with_a_fresh_window() -> None:
    health = opened(BreakerPolicy(cooldown_s=30, consecutive_failures=5, min_requests=5))
    assert health.allow(DEP, T0 + 30)
    health.record_success(DEP, T0 + 31, latency_ms=80)
    status = health.status(DEP, T0 + 31)
    assert status.state is CircuitState.CLOSED
    assert status.consecutive_failures == 0
    assert status.opened_at is None
    assert health.allow(DEP, T0 + 31)
    assert health.allow(DEP, T0 + 31), "closed again: no probe limit"
    health.record_failure(DEP, T0 + 32)
    assert health.allow(DEP, T0 + 32), "the failures that opened it no longer count"


def test_a_failed_probe_reopens_the_breaker_with_a_fresh_cooldown() -> None:
    health = opened(BreakerPolicy(cooldown_s=30))
    assert health.allow(DEP, T0 + 40)
    health.record_failure(DEP, T0 + 41)
    status = health.status(DEP, T0 + 41)
    assert status.state is CircuitState.OPEN
    assert status.opened_at == T0 + 41
    assert not health.allow(DEP, T0 + 70.9)
    assert health.allow(DEP, T0 + 71), "the new cooldown runs from the failed probe"
    assert not health.allow(DEP, T0 + 71)


def test_a_probe_that_never_reports_back_is_replaced_after_a_cooldown() -> None:
    health = opened(BreakerPolicy(cooldown_s=30))
    assert health.allow(DEP, T0 + 30)
    assert not health.allow(DEP, T0 + 59)
    assert health.allow(DEP, T0 + 60), "the lost probe must not wedge the breaker"
    assert not health.allow(DEP, T0 + 60)


def test_the_decayed_latency_prefers_the_faster_deployment() -> None:
    health = DeploymentHealth()
    for second in range(30):
        health.record_success(DEP, T0 + second, latency_ms=120, ttft_ms=40)
        health.record_success(OTHER, T0 + second, latency_ms=300, ttft_ms=90)
    assert health.latency_ms(DEP) == pytest.approx(120)
    assert health.latency_ms(OTHER) == pytest.approx(300)
    assert health.ttft_ms(DEP) == pytest.approx(40)
    assert health.ttft_ms(OTHER) == pytest.approx(90)
    health.record_success(DEP, T0 + 31, latency_ms=130)  # no TTFT for this one
    assert health.ttft_ms(DEP) == pytest.approx(40)


def test_a_deployment_made_slow_loses_its_lead_within_a_minute_of_traffic() -> None:
    health = DeploymentHealth(BreakerPolicy(latency_half_life_s=60))
    fast, steady = DEP, OTHER
    now = T0
    for _ in range(600):  # ten minutes at one call a second each
        now += 1
        health.record_success(fast, now, latency_ms=50)
        health.record_success(steady, now, latency_ms=100)
    assert health.latency_ms(fast) < health.latency_ms(steady)
    lost_lead_after = None
    for second in range(1, 121):
        now += 1
        health.record_success(fast, now, latency_ms=500)  # the fast one degrades
        health.record_success(steady, now, latency_ms=100)
        if lost_lead_after is None and health.latency_ms(fast) > health.latency_ms(steady):
            lost_lead_after = second
    assert lost_lead_after is not None and lost_lead_after <= 60
    assert health.latency_ms(fast) > 300, "after two half-lives the new latency dominates"


def test_a_burst_of_samples_at_one_instant_still_moves_the_average() -> None:
    health = DeploymentHealth()
    health.record_success(DEP, T0, latency_ms=100)
    for _ in range(99):
        health.record_success(DEP, T0, latency_ms=200)
    assert health.latency_ms(DEP) == pytest.approx(199)


def test_in_flight_counts_calls_and_never_goes_negative() -> None:
    health = DeploymentHealth()
    health.finished(DEP)  # unmatched finish of an unknown deployment
    assert health.in_flight(DEP) == 0
    health.started(DEP, T0)
    health.started(DEP, T0)
    assert health.in_flight(DEP) == 2
    for _ in range(5):
        health.finished(DEP)
    assert health.in_flight(DEP) == 0
    health.started(DEP, T0)
    assert health.in_flight(DEP) == 1
    assert health.status(DEP, T0).in_flight == 1


def test_memory_stays_bounded_over_100k_records_across_days() -> None:
    health = DeploymentHealth(BreakerPolicy(consecutive_failures=10**9, min_requests=10**9))

    def record(start: int, count: int) -> None:
        for call in range(start, start + count):
            now = T0 + call * 2.0  # one call every 2 s for each: over four days in all
            deployment_id = call % 3
            if call % 4:
                health.record_success(deployment_id, now, latency_ms=100, ttft_ms=20)
            else:
                health.record_failure(deployment_id, now)

    tracemalloc.start()
    try:
        record(0, 10_000)  # warm up: every deployment's window is full
        before, _ = tracemalloc.get_traced_memory()
        record(10_000, 90_000)
        after, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert after - before < 16_384, f"grew by {after - before} bytes"
    end = T0 + 100_000 * 2.0
    for status in health.statuses(end):
        assert status.window_requests <= 60 / 2 / 3 + 2  # only the last minute counts


def test_statuses_list_every_known_deployment_by_id() -> None:
    health = DeploymentHealth()
    health.record_success(9, T0, latency_ms=10)
    health.started(3, T0)
    health.record_failure(5, T0)
    statuses = health.statuses(T0)
    assert [status.deployment_id for status in statuses] == [3, 5, 9]
    assert statuses[1].window_failures == 1
    assert statuses[2].latency_ms == pytest.approx(10)
    assert sorted(health.deployment_ids()) == [3, 5, 9]


def test_an_open_shared_breaker_wins_over_a_local_closed_one() -> None:
    health = DeploymentHealth(BreakerPolicy(cooldown_s=30))
    health.record_success(DEP, T0, latency_ms=10)
    health.merge_shared({DEP: 12.0, OTHER: 30.0}, T0)
    assert not health.allow(DEP, T0 + 11.9)
    assert not health.allow(OTHER, T0)
    assert health.status(DEP, T0).opened_at == pytest.approx(T0 - 18)
    assert health.allow(DEP, T0 + 12), "the shared cooldown left ends, then one probe"
    assert not health.allow(DEP, T0 + 12)
    # Adopted opens are not this process's to publish.
    assert health.take_changes().opened == {}


def test_a_shared_open_extends_a_local_cooldown_but_leaves_a_probe_alone() -> None:
    health = opened(BreakerPolicy(cooldown_s=30))
    health.merge_shared({DEP: 30.0}, T0 + 10)
    assert not health.allow(DEP, T0 + 35)
    assert health.allow(DEP, T0 + 40)  # probe in flight now
    health.merge_shared({DEP: 30.0}, T0 + 41)
    health.record_success(DEP, T0 + 42, latency_ms=10)
    assert health.status(DEP, T0 + 42).state is CircuitState.CLOSED
    health.merge_shared({DEP: -1.0, OTHER: 0.0}, T0 + 43)  # expired entries are ignored
    assert health.allow(DEP, T0 + 43) and health.allow(OTHER, T0 + 43)


def test_a_close_shared_by_another_replica_closes_a_local_open_breaker() -> None:
    health = opened(BreakerPolicy(cooldown_s=30))
    health.take_changes()
    health.merge_shared({}, T0 + 5, closed=[DEP, OTHER])
    assert health.allow(DEP, T0 + 5)
    assert health.status(DEP, T0 + 5).state is CircuitState.CLOSED
    assert health.take_changes().closed == frozenset(), "not this process's close"


def test_a_local_transition_since_the_last_publish_beats_what_was_read() -> None:
    health = opened(BreakerPolicy(cooldown_s=30))
    health.merge_shared({}, T0 + 1, closed=[DEP])  # a close read while our open is unsent
    assert not health.allow(DEP, T0 + 1)
    assert health.allow(DEP, T0 + 30)
    health.record_success(DEP, T0 + 31, latency_ms=10)
    health.merge_shared({DEP: 20.0}, T0 + 31)  # an open read while our close is unsent
    assert health.allow(DEP, T0 + 31)


def test_fleet_window_counts_add_to_the_local_ones() -> None:
    policy = BreakerPolicy(consecutive_failures=100, min_requests=10, window_s=60)
    health = DeploymentHealth(policy)
    failing(health, DEP, T0, 4)
    health.merge_window({DEP: (5, 5)}, T0 + 1)
    assert health.allow(DEP, T0 + 1), "9 calls in the fleet window"
    health.merge_window({DEP: (6, 6)}, T0 + 2)
    assert not health.allow(DEP, T0 + 2), "10 failed calls across replicas"
    assert health.status(DEP, T0 + 2).window_requests == 10


def test_fleet_window_counts_expire_when_syncs_stop() -> None:
    health = DeploymentHealth(BreakerPolicy(consecutive_failures=100, min_requests=10))
    health.merge_window({DEP: (6, 6)}, T0)
    assert health.status(DEP, T0 + 30).window_requests == 6
    failing(health, DEP, T0 + 61, 4)
    assert health.allow(DEP, T0 + 61), "stale remote counts no longer count"
    health.merge_window({}, T0 + 62)
    assert health.status(DEP, T0 + 62).window_requests == 4


def test_take_changes_hands_over_transitions_and_counts_once() -> None:
    health = DeploymentHealth(BreakerPolicy(consecutive_failures=2, cooldown_s=30))
    health.record_success(OTHER, T0, latency_ms=10)
    failing(health, DEP, T0, 2)
    changes = health.take_changes()
    assert changes.opened == {DEP: T0 + 30}
    assert changes.closed == frozenset()
    assert changes.window == {DEP: (2, 2), OTHER: (1, 0)}
    assert health.take_changes().window == {}
    assert health.allow(DEP, T0 + 30)
    health.record_success(DEP, T0 + 30, latency_ms=10)
    changes = health.take_changes()
    assert changes.closed == frozenset({DEP})
    assert changes.opened == {}


@pytest.mark.parametrize(
    "fields",
    [
        {"consecutive_failures": 0},
        {"min_requests": 0},
        {"error_rate": 0.0},
        {"error_rate": 1.5},
        {"window_s": 0},
        {"cooldown_s": -1},
        {"latency_half_life_s": 0},
    ],
)
def test_a_nonsensical_policy_is_refused(fields: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        BreakerPolicy(**fields)  # type: ignore[arg-type]


def test_old_latency_counts_as_no_data_so_it_gets_measured_again() -> None:
    health = DeploymentHealth(BreakerPolicy(latency_half_life_s=10))
    health.record_success(1, 100.0, latency_ms=500)
    assert health.latency_ms(1, 110.0) == 500
    assert health.latency_ms(1, 121.0) is None  # older than two half-lives
    assert health.latency_ms(1) == 500  # without a clock: the average as it stands


def test_minute_usage_counts_requests_tokens_and_reservations_for_one_minute() -> None:
    health = DeploymentHealth()
    assert health.minute_usage(DEP, T0) == (0, 0)
    health.started(DEP, T0, reserved_tokens=500)
    assert health.minute_usage(DEP, T0) == (1, 500), "in flight: its estimate is held"
    health.finished(DEP, reserved_tokens=500)
    health.record_tokens(DEP, 320, T0 + 1)
    assert health.minute_usage(DEP, T0 + 1) == (1, 320), "finished: the real count replaces it"
    health.started(DEP, T0 + 30)
    health.finished(DEP)
    assert health.minute_usage(DEP, T0 + 59.5) == (2, 320)
    status = health.status(DEP, T0 + 59.5)
    assert (status.minute_requests, status.minute_tokens) == (2, 320)
    assert health.minute_usage(DEP, T0 + 61.5) == (1, 0), "the first seconds left the minute"
    assert health.minute_usage(DEP, T0 + 200) == (0, 0)


def test_minute_usage_adds_the_other_replicas_and_hands_over_its_own_once() -> None:
    health = DeploymentHealth()
    health.started(DEP, T0)
    health.record_tokens(DEP, 100, T0)
    assert health.take_changes().usage == {DEP: (1, 100)}
    assert health.take_changes().usage == {}
    health.merge_usage({DEP: (10, 5_000), OTHER: (3, 30)}, T0)
    assert health.minute_usage(DEP, T0) == (11, 5_100)
    assert health.minute_usage(OTHER, T0) == (3, 30)
    health.merge_usage({}, T0 + 1)
    assert health.minute_usage(DEP, T0 + 1) == (1, 100), "replaced, not accumulated"
