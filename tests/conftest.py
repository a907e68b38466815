"""Shared fixtures: tenants, routes to the mock provider, and live servers.

The suite runs twice: against PostgreSQL + Redis (DATABASE_URL/REDIS_URL set)
and against the embedded default (SQLite, in-process), see the Makefile.
"""

import os
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest
import redis
from django.conf import settings
from django.core.management.base import CommandError
from django.test import TransactionTestCase, override_settings

from billing.models import ModelPrice
from routing.models import Deployment, Provider, Route
from tenants.models import Organization, Team
from tenants.services import Actor, virtual_key_issue
from tests.factories import OrganizationFactory, TeamFactory
from tests.support.gateway import (
    GatewayServer,
    gateway_server,
    usage_ingestion,
    wait_for_key,
    wait_for_usage_writes_to_settle,
)
from tests.support.processes import mock_provider

TEST_ACTOR = Actor.system("tests")


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist each worker needs a Redis database of its own."""
    if (
        os.environ.get("PYTEST_XDIST_WORKER")
        and settings.REDIS_URL
        and not config.pluginmanager.has_plugin("tests.support.parallel")
    ):
        raise pytest.UsageError(
            "Running on several workers with Redis needs `-p tests.support.parallel` "
            "(each worker its own Redis database); `make test-postgres` passes it"
        )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The slowest tests first: pytest-xdist hands tests out in order, and one of them
    started near the end would keep its worker busy long after the others are done."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(scope="session", autouse=True)
def fresh_counters() -> None:
    """Forget budget counters, rate buckets and deployment health of earlier sessions: the
    test database is new, so its ids are reused and would find their old state (a session
    run within a minute of the last saw its deployments' breaker windows)."""
    if not settings.REDIS_URL:
        return
    client = redis.Redis.from_url(settings.REDIS_URL)
    for pattern in ("tollgate:budget:*", "tollgate:rate:*", "tollgate:health:*"):
        keys = list(client.scan_iter(match=pattern, count=1000))
        if keys:
            client.delete(*keys)
    client.close()


@pytest.fixture(scope="session", autouse=True)
def flush_survives_deadlocks() -> Iterator[None]:
    """Transactional tests empty the database (TRUNCATE) while live servers read it (a
    gateway reloading its configuration, a Celery worker); PostgreSQL may pick the
    TRUNCATE as a deadlock's victim. It is simply tried again, backing off (a loaded
    machine can lose the race several times in a row)."""
    original = TransactionTestCase._fixture_teardown
    attempts = 20  # backing off 0.1 s more each time, at most 1 s: ~15 s in all

    def teardown_retrying(test_case: TransactionTestCase) -> None:
        for attempt in range(1, attempts + 1):
            try:
                return original(test_case)
            except CommandError as error:
                if attempt == attempts or "deadlock detected" not in str(error.__cause__):
                    raise
                time.sleep(min(1.0, 0.1 * attempt))

    TransactionTestCase._fixture_teardown = teardown_retrying  # type: ignore[method-assign]
    yield
    TransactionTestCase._fixture_teardown = original  # type: ignore[method-assign]


@pytest.fixture(scope="session", autouse=True)
def plain_http_test_client() -> Iterator[None]:
    """The in-process test client speaks plain HTTP from made-up network addresses: with
    DEBUG off they would be redirected to https (gatewaysite/security.py, tested with a
    live server in tests/gatewaysite/test_deploy_check.py). Live servers are reached on
    loopback, which is never redirected."""
    with override_settings(TOLLGATE_SSL_REDIRECT=False):
        yield


@pytest.fixture(scope="session")
def mock_url() -> Iterator[str]:
    """Base URL (…/v1) of a built-in mock provider running for the whole session."""
    with mock_provider() as url:
        yield url


@pytest.fixture(scope="session")
def gateway(django_db_setup: None, mock_url: str) -> Iterator[GatewayServer]:
    """A real Tollgate server (uvicorn) on the test database, for the whole session,
    with the Celery worker that ingests its usage when there is Redis."""
    with gateway_server() as server, usage_ingestion():
        yield server


@pytest.fixture
def org(db: None) -> Organization:
    return OrganizationFactory()


@pytest.fixture
def team(org: Organization) -> Team:
    return TeamFactory(org=org)


MakeRoute = Callable[..., Route]


@pytest.fixture
def make_route(mock_url: str) -> MakeRoute:
    """Build a route to the mock provider: `make_route(model="m", org=org, ...)`.

    `upstream_model` may carry mock directives (`"m+fault=500"`); prices are
    USD per million tokens for the deployment's upstream model. `kind` picks
    the adapter; give `base_url` for kinds whose mock lives elsewhere than /v1.
    """

    def build(
        *,
        model: str,
        org: Organization | None = None,
        upstream_model: str | None = None,
        provider_org: Organization | None = None,
        base_url: str | None = None,
        kind: str = Provider.Kind.MOCK,
        api_version: str = "",
        price: tuple[str, str] | None = ("1.00", "2.00"),
        **deployment_fields: Any,
    ) -> Route:
        provider = Provider(
            org=provider_org,
            name=f"mock for {model}",
            kind=kind,
            base_url=base_url or mock_url,
            api_version=api_version,
        )
        provider.set_api_key("sk-upstream-secret-for-tests")
        provider.save()
        upstream_model = upstream_model or model
        deployment = Deployment.objects.create(
            provider=provider,
            name=f"{model}-deployment",
            upstream_model=upstream_model,
            **deployment_fields,
        )
        route = Route.objects.create(org=org, model_name=model)
        route.deployments.add(deployment)
        if price is not None:
            ModelPrice.objects.create(
                provider_kind=kind,
                model=upstream_model,
                input_usd_per_mtok=Decimal(price[0]),
                output_usd_per_mtok=Decimal(price[1]),
                effective_from=datetime(2020, 1, 1, tzinfo=UTC),
            )
        return route

    return build


IssueKey = Callable[..., str]


@pytest.fixture
def issue_key() -> IssueKey:
    """Issue a key through the service and return its plaintext."""

    def issue(org: Organization, *, name: str = "test key", **fields: Any) -> str:
        return virtual_key_issue(org=org, name=name, actor=TEST_ACTOR, **fields).plaintext

    return issue


@pytest.fixture
def live_key(gateway: GatewayServer, issue_key: IssueKey) -> Iterator[IssueKey]:
    """Like issue_key, but waits until the running gateway accepts the key.

    Afterwards it waits for the gateway to finish writing this test's usage
    events, so the test database is not flushed under the gateway's writes.
    """

    def issue(org: Organization, **fields: Any) -> str:
        plaintext = issue_key(org, **fields)
        wait_for_key(gateway, plaintext)
        return plaintext

    yield issue
    wait_for_usage_writes_to_settle()
