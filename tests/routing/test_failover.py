"""Failover, retries and circuit breakers through a running gateway and the faulty mock."""

import time

import httpx
import openai
import pytest
from openai import OpenAI

from billing.models import UsageEvent
from routing.models import Deployment, Provider, Route
from tests.conftest import IssueKey
from tests.support.gateway import (
    TEST_BREAKER_COOLDOWN_S,
    TEST_BREAKER_FAILURES,
    GatewayServer,
    wait_for_events,
    wait_until,
)

pytestmark = pytest.mark.django_db(transaction=True)

HELLO = [{"role": "user", "content": "Hello"}]


@pytest.fixture
def route_with(mock_url: str):
    """Build route "r" over deployments given as (name, upstream model, extra fields)."""

    def build(*deployments: tuple[str, str, dict], **route_fields) -> Route:
        provider = Provider.objects.create(name="mock", kind=Provider.Kind.MOCK, base_url=mock_url)
        route = Route.objects.create(model_name=route_fields.pop("model_name", "r"), **route_fields)
        for priority, (name, upstream, fields) in enumerate(deployments):
            route.deployments.add(
                Deployment.objects.create(
                    provider=provider, name=name, upstream_model=upstream, priority=priority,
                    **fields,
                )
            )  # fmt: skip
        return route

    return build


def call(gateway: GatewayServer, key: str, model: str = "r") -> httpx.Response:
    return httpx.post(
        f"{gateway.v1}/chat/completions",
        headers={"authorization": f"Bearer {key}"},
        json={"model": model, "messages": HELLO},
        timeout=15,
    )


def mock_calls(mock_url: str, upstream_model: str) -> int:
    root = mock_url.removesuffix("/v1")
    requests = httpx.get(f"{root}/_mock/requests", params={"limit": 200}).json()
    return sum(1 for r in requests if (r.get("json") or {}).get("model") == upstream_model)


def test_a_failing_primary_is_skipped_and_the_backup_answers(
    gateway: GatewayServer, org, route_with, live_key: IssueKey
) -> None:
    route_with(("primary", "p+fault=500", {}), ("backup", "b", {}))
    response = call(gateway, live_key(org))
    assert response.status_code == 200
    assert response.headers["x-tollgate-deployment"] == "backup"
    assert response.headers["x-tollgate-attempts"] == "2"
    assert response.headers["x-request-id"]
    (event,) = wait_for_events(UsageEvent.objects.filter(org=org, endpoint="chat.completions"), 1)
    assert (event.deployment_name, event.attempts, event.outcome) == ("backup", 2, "success")


def test_a_primary_that_hangs_times_out_and_the_backup_answers(
    gateway: GatewayServer, org, route_with, live_key: IssueKey
) -> None:
    route_with(("primary", "p+fault=hang", {"total_timeout_ms": 500}), ("backup", "b", {}))
    client = OpenAI(base_url=gateway.v1, api_key=live_key(org), max_retries=0)
    reply = client.chat.completions.with_raw_response.create(model="r", messages=HELLO)
    assert reply.headers["x-tollgate-deployment"] == "backup"
    stream = client.chat.completions.create(model="r", messages=HELLO, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)


def test_the_circuit_opens_then_a_probe_closes_it(
    gateway: GatewayServer, org, mock_url: str, route_with, live_key: IssueKey
) -> None:
    route = route_with(("primary", "cb-primary+fault=500", {}), ("backup", "cb-backup", {}))
    key = live_key(org)
    for _ in range(TEST_BREAKER_FAILURES):
        assert call(gateway, key).headers["x-tollgate-deployment"] == "backup"
    failed = mock_calls(mock_url, "cb-primary+fault=500")
    assert failed == TEST_BREAKER_FAILURES
    # Open: traffic no longer touches the primary.
    for _ in range(5):
        response = call(gateway, key)
        assert (
            response.headers["x-tollgate-deployment"],
            response.headers["x-tollgate-attempts"],
        ) == ("backup", "1")
    assert mock_calls(mock_url, "cb-primary+fault=500") == failed

    # The primary recovers; after the cooldown one probe reaches it and closes the circuit.
    Deployment.objects.filter(routes=route, name="primary").update(upstream_model="cb-primary")
    from tenants.config import config_revision_bump

    config_revision_bump()
    time.sleep(TEST_BREAKER_COOLDOWN_S + 0.2)
    wait_until(
        lambda: call(gateway, key).headers["x-tollgate-deployment"] == "primary",
        what="the probe to close the circuit",
    )
    assert call(gateway, key).headers["x-tollgate-deployment"] == "primary"


def test_retry_after_is_honoured_before_retrying(
    gateway: GatewayServer, org, route_with, live_key: IssueKey
) -> None:
    route_with(("only", "o+fault=429+retry_after=1", {}), max_attempts=2)
    started = time.monotonic()
    with pytest.raises(openai.RateLimitError):
        OpenAI(base_url=gateway.v1, api_key=live_key(org), max_retries=0).chat.completions.create(
            model="r", messages=HELLO
        )
    assert time.monotonic() - started >= 1.0
    (event,) = wait_for_events(UsageEvent.objects.filter(org=org, endpoint="chat.completions"), 1)
    assert (event.attempts, event.status_code) == (2, 429)


def test_a_request_the_provider_rejects_is_not_retried(
    gateway: GatewayServer, org, mock_url: str, route_with, live_key: IssueKey
) -> None:
    route_with(("primary", "rej+fault=400", {}), ("backup", "rej-backup", {}))
    assert call(gateway, live_key(org)).status_code == 400
    assert mock_calls(mock_url, "rej-backup") == 0


def test_cross_model_fallback_to_another_route(
    gateway: GatewayServer, org, route_with, live_key: IssueKey
) -> None:
    route_with(("gpt-down", "g+fault=503", {}), model_name="gpt", fallback_models=["claude"])
    route_with(("claude-up", "c", {}), model_name="claude")
    response = call(gateway, live_key(org), model="gpt")
    assert response.status_code == 200
    assert response.headers["x-tollgate-deployment"] == "claude-up"


def test_long_requests_go_to_the_deployment_with_the_larger_context(
    gateway: GatewayServer, org, route_with, live_key: IssueKey
) -> None:
    route_with(("small", "s", {"context_window_tokens": 60}), ("large", "l", {}))
    key = live_key(org)
    assert call(gateway, key).headers["x-tollgate-deployment"] == "small"
    long_prompt = [{"role": "user", "content": "word " * 400}]
    response = httpx.post(
        f"{gateway.v1}/chat/completions",
        headers={"authorization": f"Bearer {key}"},
        json={"model": "r", "messages": long_prompt},
    )
    assert response.headers["x-tollgate-deployment"] == "large"
