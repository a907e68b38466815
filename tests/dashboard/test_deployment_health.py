"""Deployment health in the dashboard and the API: circuit state as the live fleet sees it."""

import httpx
import pytest
from django.test import Client

from routing.health import CircuitState, DeploymentStatus
from routing.models import Deployment
from tenants.models import Membership
from tests.conftest import IssueKey, MakeRoute
from tests.factories import OrganizationFactory, UserFactory
from tests.support.dashboard import health_board_reporting, signed_in_as
from tests.support.gateway import TEST_BREAKER_COOLDOWN_S, GatewayServer, wait_until

pytestmark = pytest.mark.django_db(transaction=True)


def session_for(role: str, org) -> dict[str, str]:
    """A signed-in session cookie for a new member of `org` with `role`."""
    user = UserFactory()
    Membership.objects.create(user=user, org=org, role=role)
    client = Client()
    client.force_login(user)
    return {"sessionid": client.cookies["sessionid"].value}


def test_an_opened_circuit_shows_in_the_api_and_the_dashboard(
    gateway: GatewayServer, org, make_route: MakeRoute, live_key: IssueKey
) -> None:
    make_route(model="flaky", org=org, upstream_model="flaky+fault=500")
    make_route(model="steady", org=org, upstream_model="steady")
    other = OrganizationFactory(name="Other Org")
    make_route(model="theirs", org=other, provider_org=other, upstream_model="theirs")
    key = live_key(org)
    admin = session_for(Membership.Role.ADMIN, org)

    with httpx.Client(base_url=gateway.base_url, cookies=admin) as client:
        for model in ("flaky", "steady"):
            client.post(
                "/v1/chat/completions",
                headers={"authorization": f"Bearer {key}"},
                json={"model": model, "messages": [{"role": "user", "content": "hi"}]},
            )

        def health() -> dict[str, dict]:
            response = client.get(f"/api/v1/deployments/health/?org={org.slug}")
            assert response.status_code == 200, response.text
            return {row["name"]: row for row in response.json()["data"]}

        rows = wait_until(
            lambda: (h := health())["flaky-deployment"]["circuit"] == "open" and h,
            what="the flaky deployment's circuit to show as open",
        )
        flaky, steady = rows["flaky-deployment"], rows["steady-deployment"]
        # The board is posted once a second: on a busy machine the cooldown may have run
        # out by then, and the breaker waits for the next request to probe (retry in 0 s).
        assert 0 <= flaky["retry_in_s"] <= TEST_BREAKER_COOLDOWN_S, flaky
        # Every call it saw failed (the exact counting is tests/routing/test_health.py's).
        assert flaky["window_failures"] == flaky["window_requests"] > 0, flaky
        assert flaky["routes"] == ["flaky"]
        assert steady["circuit"] == "closed" and steady["live"]
        assert steady["latency_ms"] is not None and steady["requests_last_minute"] == 1
        assert "theirs-deployment" not in rows, "another organization's deployment"

        page = client.get(f"/dashboard/health/?org={org.slug}")
        assert page.status_code == 200
        assert "flaky-deployment" in page.text and ">Open</span>" in page.text
        assert "theirs-deployment" not in page.text


def test_only_owners_and_admins_of_the_org_see_deployment_health(
    gateway: GatewayServer, org
) -> None:
    other = OrganizationFactory(name="Elsewhere")
    outsider = session_for(Membership.Role.OWNER, other)
    finance = session_for(Membership.Role.FINANCE, org)
    url = f"{gateway.base_url}/api/v1/deployments/health/?org={org.slug}"
    assert httpx.get(url, cookies=outsider).status_code == 404
    assert httpx.get(url, cookies=finance).status_code == 403
    assert httpx.get(url).status_code == 401, "not signed in"
    page = f"{gateway.base_url}/dashboard/health/?org={org.slug}"
    assert httpx.get(page, cookies=finance).status_code == 403


@pytest.mark.parametrize(
    ("retry_in_s", "shown"), [(20.0, "probe in 20 s"), (0.0, "probe on the next request")]
)
def test_an_open_circuit_says_when_it_will_probe(
    org, make_route: MakeRoute, retry_in_s: float, shown: str
) -> None:
    make_route(model="down", org=org, upstream_model="down")
    deployment = Deployment.objects.get(name="down-deployment")
    status = DeploymentStatus(
        deployment_id=deployment.pk, state=CircuitState.OPEN, consecutive_failures=3,
        window_requests=3, window_failures=3, latency_ms=None, ttft_ms=None, in_flight=0,
        opened_at=None, retry_in_s=retry_in_s,
    )  # fmt: skip
    admin = signed_in_as(Membership.Role.ADMIN, org)
    with health_board_reporting([status]):
        api = admin.get(f"/api/v1/deployments/health/?org={org.slug}")
        page = admin.get(f"/dashboard/health/?org={org.slug}").content.decode()
    (row,) = api.json()["data"]
    assert row["circuit"] == "open" and row["retry_in_s"] == retry_in_s
    assert shown in page
