"""A/B splits and shadow traffic through a running gateway."""

import collections

import httpx
import pytest

from billing.models import UsageEvent
from routing.models import Deployment, Provider, Route
from routing.proxy.failover import ab_bucket
from tests.conftest import IssueKey
from tests.support.gateway import GatewayServer, wait_for_events, wait_until

pytestmark = pytest.mark.django_db(transaction=True)

HELLO = [{"role": "user", "content": "Hello"}]


@pytest.fixture
def split_route(mock_url: str):
    def build(**route_fields) -> Route:
        provider = Provider.objects.create(name="mock", kind=Provider.Kind.MOCK, base_url=mock_url)

        def deployment(name: str, upstream: str) -> Deployment:
            return Deployment.objects.create(provider=provider, name=name, upstream_model=upstream)

        main = deployment("main", "ab-main")
        fields = {
            key: deployment(*value) if key.endswith("_deployment") else value
            for key, value in route_fields.items()
        }
        route = Route.objects.create(model_name="r", **fields)
        route.deployments.add(main)
        return route

    return build


def served_by(gateway: GatewayServer, key: str, **extra) -> str:
    response = httpx.post(
        f"{gateway.v1}/chat/completions",
        headers={"authorization": f"Bearer {key}"},
        json={"model": "r", "messages": HELLO, **extra},
    )
    assert response.status_code == 200, response.text
    return response.headers["x-tollgate-deployment"]


def test_all_traffic_goes_to_a_variant_at_100_percent_and_none_at_0(
    gateway: GatewayServer, org, split_route, live_key: IssueKey
) -> None:
    split_route(variant_deployment=("variant", "ab-variant"), variant_percent=100)
    key = live_key(org)
    assert {served_by(gateway, key) for _ in range(5)} == {"variant"}
    Route.objects.filter(model_name="r").update(variant_percent=0)
    from tenants.config import config_revision_bump

    config_revision_bump()
    wait_until(lambda: served_by(gateway, key) == "main", what="the split to change")


def test_a_split_is_sticky_per_end_user(
    gateway: GatewayServer, org, split_route, live_key: IssueKey
) -> None:
    split_route(
        variant_deployment=("variant", "ab-variant"), variant_percent=50, variant_sticky_by="user"
    )
    key = live_key(org)
    arms = collections.defaultdict(set)
    for user in [f"user-{n}" for n in range(16)]:
        for _ in range(3):
            arms[user].add(served_by(gateway, key, user=user))
    assert all(len(seen) == 1 for seen in arms.values())  # sticky
    assert {next(iter(seen)) for seen in arms.values()} == {"main", "variant"}  # both arms used


def test_buckets_split_subjects_evenly() -> None:
    buckets = [ab_bucket(7, f"subject-{n}") for n in range(10_000)]
    below = sum(1 for bucket in buckets if bucket < 30)
    assert abs(below / 10_000 - 0.30) < 0.02
    assert ab_bucket(7, "same") == ab_bucket(7, "same")


def test_shadow_traffic_is_mirrored_in_the_background_and_never_seen(
    gateway: GatewayServer, org, split_route, live_key: IssueKey, mock_url: str
) -> None:
    split_route(shadow_deployment=("candidate", "ab-candidate"), shadow_percent=100)
    key = live_key(org)
    response = httpx.post(
        f"{gateway.v1}/chat/completions",
        headers={"authorization": f"Bearer {key}"},
        json={"model": "r", "messages": HELLO, "stream": True},
    )
    assert response.headers["x-tollgate-deployment"] == "main"
    assert "data: [DONE]" in response.text
    (shadow,) = wait_for_events(
        UsageEvent.objects.filter(org=org, endpoint="chat.completions.shadow"), 1
    )
    assert (shadow.deployment_name, shadow.outcome, shadow.is_stream) == (
        "candidate", "success", False
    )  # fmt: skip
    assert shadow.output_tokens > 0
    root = mock_url.removesuffix("/v1")
    mirrored = [
        r for r in httpx.get(f"{root}/_mock/requests", params={"limit": 200}).json()
        if (r.get("json") or {}).get("model") == "ab-candidate"
    ]  # fmt: skip
    assert mirrored and "stream" not in mirrored[-1]["json"]


def test_a_failing_shadow_never_hurts_the_client(
    gateway: GatewayServer, org, split_route, live_key: IssueKey
) -> None:
    split_route(shadow_deployment=("broken", "ab-broken+fault=500"), shadow_percent=100)
    key = live_key(org)
    assert served_by(gateway, key) == "main"
    (shadow,) = wait_for_events(
        UsageEvent.objects.filter(org=org, endpoint="chat.completions.shadow"), 1
    )
    assert shadow.outcome == "upstream_error"
