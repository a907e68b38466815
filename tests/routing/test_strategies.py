"""Routing strategies end to end: real requests through a gateway to the mock provider."""

import collections
import time
from datetime import UTC, datetime
from decimal import Decimal

import httpx
import openai
import pytest

from billing.models import ModelPrice
from routing.models import Deployment, Provider, Route
from tenants.config import config_revision_bump
from tests.conftest import IssueKey
from tests.support.gateway import GatewayServer

pytestmark = pytest.mark.django_db(transaction=True)

HELLO = [{"role": "user", "content": "Hello"}]


@pytest.fixture
def strategy_route(mock_url: str):
    def build(strategy: str, *deployments: tuple[str, str, dict]) -> Route:
        provider = Provider.objects.create(name="mock", kind=Provider.Kind.MOCK, base_url=mock_url)
        route = Route.objects.create(model_name="r", strategy=strategy)
        for name, upstream, fields in deployments:
            route.deployments.add(
                Deployment.objects.create(
                    provider=provider, name=name, upstream_model=upstream, **fields
                )
            )
        return route

    return build


def served_by(client: httpx.Client, gateway: GatewayServer, key: str) -> str:
    response = client.post(
        f"{gateway.v1}/chat/completions",
        headers={"authorization": f"Bearer {key}"},
        json={"model": "r", "messages": HELLO, "max_tokens": 1},
    )
    assert response.status_code == 200, response.text
    return response.headers["x-tollgate-deployment"]


def test_weighted_routing_over_1000_requests_follows_the_weights(
    gateway: GatewayServer, org, strategy_route, live_key: IssueKey
) -> None:
    strategy_route(
        "weighted", ("heavy", "w-heavy", {"weight": 7}), ("light", "w-light", {"weight": 3})
    )
    key = live_key(org)
    with httpx.Client() as client:
        counts = collections.Counter(served_by(client, gateway, key) for _ in range(1_000))
    assert abs(counts["heavy"] / 1_000 - 0.70) < 0.05
    assert abs(counts["light"] / 1_000 - 0.30) < 0.05


def test_lowest_cost_sends_traffic_to_the_cheaper_deployment(
    gateway: GatewayServer, org, strategy_route, live_key: IssueKey
) -> None:
    start = datetime(2020, 1, 1, tzinfo=UTC)
    for model, rate in (("c-dear", "10"), ("c-cheap", "0.5")):
        ModelPrice.objects.create(provider_kind="mock", model=model, effective_from=start,
                                  input_usd_per_mtok=Decimal(rate),
                                  output_usd_per_mtok=Decimal(rate))  # fmt: skip
    strategy_route("lowest_cost", ("dear", "c-dear", {}), ("cheap", "c-cheap", {}))
    key = live_key(org)
    with httpx.Client() as client:
        assert {served_by(client, gateway, key) for _ in range(10)} == {"cheap"}


def test_least_latency_moves_traffic_away_from_a_deployment_made_slow(
    gateway: GatewayServer, org, strategy_route, live_key: IssueKey
) -> None:
    route = strategy_route("least_latency", ("a", "l-a", {}), ("b", "l-b+latency_ms=150", {}))
    key = live_key(org)
    with httpx.Client() as client:
        for _ in range(5):
            served_by(client, gateway, key)  # both get measured
        recent = [served_by(client, gateway, key) for _ in range(10)]
        assert recent.count("a") >= 9

        # Now "a" turns slow and "b" fast: traffic follows within a few seconds.
        Deployment.objects.filter(routes=route, name="a").update(
            upstream_model="l-a+latency_ms=150"
        )
        Deployment.objects.filter(routes=route, name="b").update(upstream_model="l-b")
        config_revision_bump()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if [served_by(client, gateway, key) for _ in range(5)].count("b") == 5:
                break
        else:
            pytest.fail("least-latency routing kept sending traffic to the slow deployment")


def test_usage_aware_keeps_each_deployment_under_its_rpm_limit(
    gateway: GatewayServer, org, strategy_route, live_key: IssueKey
) -> None:
    strategy_route(
        "usage_aware", ("small", "u-small", {"rpm_limit": 3}), ("big", "u-big", {"rpm_limit": 9})
    )
    key = live_key(org)
    with httpx.Client() as client:
        counts = collections.Counter(served_by(client, gateway, key) for _ in range(12))
    assert counts == {"small": 3, "big": 9}, "both filled exactly to their limits"

    sdk = openai.OpenAI(base_url=gateway.v1, api_key=key, max_retries=0)
    with pytest.raises(openai.RateLimitError) as raised:
        sdk.chat.completions.create(model="r", messages=HELLO, max_tokens=1)
    assert raised.value.code == "deployment_rate_limited"
    assert raised.value.response.headers["retry-after"]
