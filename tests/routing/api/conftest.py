"""Routing configuration to drive the management API with: the org's own and another's."""

from dataclasses import dataclass

import pytest

from routing.models import Deployment, Provider, Route
from routing.services import deployment_create, provider_create, route_create
from tenants.models import Organization
from tests.conftest import TEST_ACTOR
from tests.factories import OrganizationFactory

SECRET = "sk-live-do-not-leak-0123456789abcdef"


@dataclass(frozen=True)
class Routing:
    provider: Provider
    deployment: Deployment
    route: Route


def routing_of(org: Organization | None, *, name: str = "OpenAI") -> Routing:
    """A provider (holding SECRET as its key), one deployment and a route using it."""
    provider = provider_create(
        org=org,
        actor=TEST_ACTOR,
        values={"name": name, "kind": "openai", "base_url": "", "api_version": "", "enabled": True},
        api_key=SECRET,
    )
    deployment = deployment_create(
        provider=provider,
        actor=TEST_ACTOR,
        values={"name": f"{name} mini", "upstream_model": "gpt-4o-mini"},
    )
    route = route_create(
        org=org, actor=TEST_ACTOR, values={"model_name": f"{name}-fast"}, deployments=[deployment]
    )
    return Routing(provider=provider, deployment=deployment, route=route)


@pytest.fixture
def ours(org: Organization) -> Routing:
    return routing_of(org)


@pytest.fixture
def theirs(db: None) -> Routing:
    return routing_of(OrganizationFactory(), name="Theirs")
