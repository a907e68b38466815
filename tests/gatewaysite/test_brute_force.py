"""Brute-force guards (django-ratelimit): the sign-in page and the management API."""

import time
import types
import uuid
from typing import Any

import pytest
from django.test import Client, override_settings

from tenants.models import Membership
from tests.factories import OrganizationFactory, UserFactory

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("limiter_clock")]


@pytest.fixture
def limiter_clock(monkeypatch: pytest.MonkeyPatch, settings: Any) -> None:
    """Holds django-ratelimit's clock still and gives each test counts of its own: the
    windows are fixed minutes, so a test straddling a window's end would see its count
    start again, and a rerun within the minute would find the last run's counts."""
    frozen = time.time()
    monkeypatch.setattr("django_ratelimit.core.time", types.SimpleNamespace(time=lambda: frozen))
    settings.RATELIMIT_CACHE_PREFIX = f"rl:{uuid.uuid4().hex}:"


def fresh_address() -> str:
    """A client address of its own, so counts of other tests (or runs) never mix in."""
    return f"10.{uuid.uuid4().int % 250}.{uuid.uuid4().int % 250}.{uuid.uuid4().int % 250 + 1}"


def test_the_eleventh_sign_in_attempt_in_a_minute_is_refused() -> None:
    user = UserFactory(username="ada", is_staff=True)
    user.set_password("correct horse battery staple")
    user.save()
    client, address = Client(), fresh_address()
    for _ in range(10):
        wrong = client.post(
            "/admin/login/", {"username": "ada", "password": "guess"}, REMOTE_ADDR=address
        )
        assert wrong.status_code == 200 and b"correct username and password" in wrong.content
    refused = client.post(
        "/admin/login/",
        {"username": "ada", "password": "correct horse battery staple"},
        REMOTE_ADDR=address,
    )
    assert refused.status_code == 429 and refused["Retry-After"] == "60"
    assert "_auth_user_id" not in client.session  # even the right password waits
    # Another address is not held back by this one's attempts.
    other = client.post(
        "/admin/login/",
        {"username": "ada", "password": "correct horse battery staple"},
        REMOTE_ADDR=fresh_address(),
    )
    assert other.status_code == 302


@override_settings(TOLLGATE_API_RATE_LIMIT="3/m")
def test_the_management_api_refuses_a_caller_over_its_rate() -> None:
    org = OrganizationFactory()
    user = UserFactory()
    Membership.objects.create(user=user, org=org, role=Membership.Role.ADMIN)
    client, address = Client(), fresh_address()
    client.force_login(user)
    url = f"/api/v1/deployments/health/?org={org.slug}"
    assert [client.get(url, REMOTE_ADDR=address).status_code for _ in range(3)] == [200] * 3
    refused = client.get(url, REMOTE_ADDR=address)
    assert refused.status_code == 429 and refused["Retry-After"] == "60"
    assert "Too many API calls" in refused.json()["error"]["message"]
    assert refused.json()["error"]["type"] == "rate_limit_error"

    # Callers who are not signed in are counted by address, failures included.
    anonymous, elsewhere = Client(), fresh_address()
    statuses = [anonymous.get(url, REMOTE_ADDR=elsewhere).status_code for _ in range(4)]
    assert statuses == [401, 401, 401, 429]
