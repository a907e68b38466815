"""The failover loop and the strategies, with fake upstream calls (no network)."""

import asyncio
import collections
import random
import time
from dataclasses import replace
from datetime import UTC, datetime
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from billing.contracts import PriceRates
from routing.contracts import DeploymentSpec, RoutePlan
from routing.errors import (
    InvalidRequest,
    LimitExceeded,
    NoDeploymentAvailable,
    UpstreamError,
    UpstreamRateLimited,
    UpstreamRejected,
    UpstreamTimeout,
)
from routing.health import BreakerPolicy, DeploymentHealth
from routing.proxy.failover import Demand, order_deployments, serve_with_failover
from routing.snapshot import ConfigSnapshot

DEMAND = Demand(prompt_tokens=100, max_output_tokens=100)


def spec(deployment_id: int, **fields) -> DeploymentSpec:
    base = DeploymentSpec(
        deployment_id=deployment_id, name=f"d{deployment_id}", provider_id=1,
        provider_kind="mock", base_url="http://x", api_key="", api_version="",
        upstream_model=f"m{deployment_id}", weight=1, priority=deployment_id,
        connect_timeout_s=1, ttft_timeout_s=1, read_timeout_s=1, total_timeout_s=1,
    )  # fmt: skip
    return replace(base, **fields)


def plan(*deployments: DeploymentSpec, **fields) -> RoutePlan:
    base = RoutePlan(
        route_id=1, org_id=None, model_name="m", strategy="priority", deployments=deployments,
        unsupported_params="reject", fallback_models=(), max_attempts=3, deadline_s=30,
        cache_ttl_s=0, cache_hits_billed=False, created=0,
    )  # fmt: skip
    return replace(base, **fields)


def snapshot(*plans: RoutePlan, prices=()) -> ConfigSnapshot:
    by_pair = collections.defaultdict(list)
    for rates in prices:
        by_pair[(rates.provider_kind, rates.model)].append(rates)
    return ConfigSnapshot(
        revision="r", keys_by_prefix={}, routes={(p.org_id, p.model_name): p for p in plans},
        prices={pair: tuple(rows) for pair, rows in by_pair.items()},
    )  # fmt: skip


def health() -> DeploymentHealth:
    return DeploymentHealth(BreakerPolicy(consecutive_failures=3, cooldown_s=30))


async def serve(route: RoutePlan, outcomes: dict[int, list], *, state=None, snap=None):
    """Serve `route` where deployment i answers with outcomes[i] in turn (exception or value)."""
    state = state or health()
    calls: list[int] = []

    async def attempt(deployment, adapter):
        calls.append(deployment.deployment_id)
        result = outcomes[deployment.deployment_id].pop(0)
        if isinstance(result, Exception):
            raise result
        return result

    adapters = {"mock": object(), "anthropic": object()}
    result = await serve_with_failover(
        route, snapshot=snap or snapshot(route), adapters=adapters, health=state, org_id=1,
        demand=DEMAND, attempt=attempt, on_attempt=lambda deployment: None,
    )  # fmt: skip
    return result, calls


@pytest.mark.asyncio
async def test_a_failing_primary_fails_over_to_the_backup() -> None:
    result, calls = await serve(
        plan(spec(1), spec(2)), {1: [UpstreamError("boom")], 2: ["backup answer"]}
    )
    assert (result, calls) == ("backup answer", [1, 2])


@pytest.mark.asyncio
async def test_errors_caused_by_the_request_are_never_retried() -> None:
    with pytest.raises(UpstreamRejected):
        await serve(plan(spec(1), spec(2)), {1: [UpstreamRejected("bad")], 2: ["never"]})


@pytest.mark.asyncio
async def test_a_lone_deployment_is_retried_after_its_retry_after() -> None:
    limited = UpstreamRateLimited("slow down", headers={"retry-after": "1"})
    started = asyncio.get_running_loop().time()
    result, calls = await serve(plan(spec(1)), {1: [limited, "ok"]})
    assert (result, calls) == ("ok", [1, 1])
    assert asyncio.get_running_loop().time() - started >= 1.0


@pytest.mark.asyncio
async def test_retry_after_beyond_the_deadline_gives_up_at_once() -> None:
    limited = UpstreamRateLimited("slow down", headers={"retry-after": "60"})
    with pytest.raises(UpstreamRateLimited):
        await serve(plan(spec(1), deadline_s=2), {1: [limited, "never"]})


@pytest.mark.asyncio
async def test_open_circuits_are_skipped_until_their_cooldown() -> None:
    state = health()
    for _ in range(3):
        state.record_failure(1, time.monotonic())
    result, calls = await serve(plan(spec(1), spec(2)), {1: ["never"], 2: ["ok"]}, state=state)
    assert (result, calls) == ("ok", [2])


@pytest.mark.asyncio
async def test_all_circuits_open_is_a_503_with_retry_after() -> None:
    state = health()
    for _ in range(3):
        state.record_failure(1, time.monotonic())
    with pytest.raises(NoDeploymentAvailable) as raised:
        await serve(plan(spec(1)), {1: ["never"]}, state=state)
    assert raised.value.status == 503 and "retry-after" in raised.value.headers


@pytest.mark.asyncio
async def test_cross_model_fallback_serves_from_another_route() -> None:
    gpt = plan(spec(1), fallback_models=("claude",))
    claude = plan(spec(2, provider_kind="anthropic"), route_id=2, model_name="claude")
    result, calls = await serve(
        gpt, {1: [UpstreamTimeout("slow")], 2: ["from claude"]}, snap=snapshot(gpt, claude)
    )
    assert (result, calls) == ("from claude", [1, 2])


@pytest.mark.asyncio
async def test_a_request_too_long_for_one_model_goes_to_a_larger_one() -> None:
    small, large = spec(1, context_window_tokens=150), spec(2, context_window_tokens=10_000)
    result, calls = await serve(plan(small, large), {1: ["never"], 2: ["large"]})
    assert (result, calls) == ("large", [2])
    with pytest.raises(InvalidRequest) as raised:
        await serve(plan(small), {1: ["never"]})
    assert raised.value.code == "context_length_exceeded"


@settings(max_examples=300, deadline=None)
@given(
    failures=st.lists(
        st.sampled_from(["500", "timeout", "429", "ok"]), min_size=1, max_size=6
    ).filter(lambda pattern: "ok" in pattern),
    max_attempts=st.integers(min_value=1, max_value=4),
)
def test_a_request_never_fails_while_a_healthy_deployment_remains(failures, max_attempts) -> None:
    """Whatever fails, the first healthy deployment in the route is always reached."""
    errors = {
        "500": lambda: UpstreamError("500"),
        "timeout": lambda: UpstreamTimeout("slow"),
        "429": lambda: UpstreamRateLimited("busy"),
    }
    deployments = [spec(index + 1) for index in range(len(failures))]
    outcomes = {
        index + 1: [("served", index + 1) if kind == "ok" else errors[kind]()] * 5
        for index, kind in enumerate(failures)
    }
    route = plan(*deployments, max_attempts=max_attempts)
    result, calls = asyncio.run(serve(route, outcomes))
    assert result == ("served", failures.index("ok") + 1)
    assert calls == list(range(1, failures.index("ok") + 2))


def test_weighted_routing_follows_the_weights() -> None:
    random.seed(7)
    route = plan(spec(1, weight=70), spec(2, weight=20), spec(3, weight=10), strategy="weighted")
    firsts = collections.Counter(
        order_deployments(route, health=health(), snapshot=snapshot(route), org_id=1,
                          demand=DEMAND)[0].deployment_id
        for _ in range(1_000)
    )  # fmt: skip
    assert abs(firsts[1] / 1_000 - 0.70) < 0.05
    assert abs(firsts[2] / 1_000 - 0.20) < 0.05
    assert abs(firsts[3] / 1_000 - 0.10) < 0.05


def test_lowest_cost_prefers_the_cheaper_deployment_for_this_request() -> None:
    moment = datetime(2020, 1, 1, tzinfo=UTC)

    def price(model: str, input_rate: str, output_rate: str) -> PriceRates:
        return PriceRates(
            price_id=1, org_id=None, provider_kind="mock", model=model,
            input_usd_per_mtok=Decimal(input_rate), output_usd_per_mtok=Decimal(output_rate),
            cached_input_usd_per_mtok=None, reasoning_usd_per_mtok=None,
            effective_from=moment, effective_until=None,
        )  # fmt: skip

    route = plan(spec(1), spec(2), spec(3), strategy="lowest_cost")
    snap = snapshot(route, prices=[price("m1", "5", "15"), price("m2", "0.5", "1.5")])
    ordered = order_deployments(route, health=health(), snapshot=snap, org_id=1, demand=DEMAND)
    assert [d.deployment_id for d in ordered] == [2, 1, 3]  # unpriced last


def test_least_latency_and_least_busy_follow_live_measurements() -> None:
    state = health()
    now = time.monotonic()
    state.record_success(1, now, latency_ms=900)
    state.record_success(2, now, latency_ms=50)
    fast_first = plan(spec(1), spec(2), strategy="least_latency")
    ordered = order_deployments(
        fast_first, health=state, snapshot=snapshot(fast_first), org_id=1, demand=DEMAND
    )
    assert ordered[0].deployment_id == 2

    busy = plan(spec(1), spec(2), strategy="least_busy")
    state.started(1, time.monotonic())
    state.started(1, time.monotonic())
    ordered = order_deployments(
        busy, health=state, snapshot=snapshot(busy), org_id=1, demand=DEMAND
    )
    assert ordered[0].deployment_id == 2


@pytest.mark.asyncio
async def test_the_prompt_is_only_counted_when_a_routing_decision_needs_it() -> None:
    counted = []

    def estimate() -> int:
        counted.append(1)
        return 10

    route = plan(spec(1), spec(2))
    await serve_with_failover(
        route, snapshot=snapshot(route), adapters={"mock": object()}, health=health(), org_id=1,
        demand=Demand(estimate=estimate, max_output_tokens=None),
        attempt=lambda deployment, adapter: asyncio.sleep(0, "ok"),
        on_attempt=lambda deployment: None,
    )  # fmt: skip
    assert counted == []
    sized = plan(spec(1, context_window_tokens=50))
    await serve_with_failover(
        sized, snapshot=snapshot(sized), adapters={"mock": object()}, health=health(), org_id=1,
        demand=Demand(estimate=estimate, max_output_tokens=None),
        attempt=lambda deployment, adapter: asyncio.sleep(0, "ok"),
        on_attempt=lambda deployment: None,
    )  # fmt: skip
    assert counted == [1]


def test_usage_aware_prefers_the_deployment_with_the_most_headroom() -> None:
    state = health()
    now = time.monotonic()
    small, large = spec(1, rpm_limit=10), spec(2, rpm_limit=100)
    route = plan(small, large, strategy="usage_aware")
    for _ in range(5):
        state.started(2, now)  # 5% of large's minute against 10% of small's next call
        state.finished(2)
    ordered = order_deployments(
        route, health=state, snapshot=snapshot(route), org_id=1, demand=DEMAND
    )
    assert [d.deployment_id for d in ordered] == [2, 1]
    for _ in range(60):
        state.started(2, now)
        state.finished(2)
    ordered = order_deployments(
        route, health=state, snapshot=snapshot(route), org_id=1, demand=DEMAND
    )
    assert [d.deployment_id for d in ordered] == [1, 2], "large is now the busier one"

    by_tokens = plan(spec(3, tpm_limit=1_000), spec(4, tpm_limit=100_000), strategy="usage_aware")
    ordered = order_deployments(
        by_tokens, health=state, snapshot=snapshot(by_tokens), org_id=1, demand=DEMAND
    )
    assert ordered[0].deployment_id == 4, "200 tokens are 20% of the small TPM limit"


@pytest.mark.asyncio
async def test_a_deployment_at_its_rpm_limit_is_skipped_for_the_next() -> None:
    state = health()
    limited = plan(spec(1, rpm_limit=2), spec(2))
    served = [(await serve(limited, {1: ["one"], 2: ["two"]}, state=state))[1] for _ in range(3)]
    assert served == [[1], [1], [2]], "the third call this minute would break the limit"


@pytest.mark.asyncio
async def test_tokens_in_flight_count_against_the_tpm_limit() -> None:
    state = health()
    state.started(1, time.monotonic(), reserved_tokens=900)  # a long call still running
    route = plan(spec(1, tpm_limit=1_000), spec(2))
    _, calls = await serve(route, {1: ["never"], 2: ["ok"]}, state=state)
    assert calls == [2], "900 held + 200 for this request would exceed 1,000"


@pytest.mark.asyncio
async def test_every_deployment_at_its_limit_is_a_429_with_retry_after() -> None:
    state = health()
    route = plan(spec(1, rpm_limit=1), spec(2, rpm_limit=1))
    await serve(route, {1: ["a"], 2: ["b"]}, state=state)
    await serve(route, {1: ["a"], 2: ["b"]}, state=state)
    with pytest.raises(LimitExceeded) as raised:
        await serve(route, {1: ["never"], 2: ["never"]}, state=state)
    assert raised.value.status == 429
    assert raised.value.code == "deployment_rate_limited"
    assert "retry-after" in raised.value.headers
