"""Providers & routes pages: owners and admins configure their own org's routing."""

from collections.abc import Iterator

import pytest
from django.test import Client
from django.urls import reverse

from routing.health import CircuitState, DeploymentStatus
from routing.models import Deployment, Provider, Route
from routing.services import deployment_create, provider_create, route_create
from tenants.models import AuditLog, Organization
from tenants.services import Actor
from tests.factories import OrganizationFactory, TeamFactory
from tests.support.dashboard import health_board_reporting, signed_in_as

pytestmark = pytest.mark.django_db

ACTOR = Actor.system("tests")
SECRET = "sk-stored-secret-never-shown-9876"


def url(name: str, org: Organization, *args: object) -> str:
    return f"{reverse(name, args=args)}?org={org.slug}"


def make_provider(org: Organization, name: str = "OpenAI", **values: object) -> Provider:
    fields = {"name": name, "kind": Provider.Kind.OPENAI, "base_url": "", **values}
    return provider_create(org=org, actor=ACTOR, values=fields, api_key=SECRET)


def make_deployment(provider: Provider, name: str = "mini") -> Deployment:
    values = {"name": name, "upstream_model": "gpt-4o-mini"}
    return deployment_create(provider=provider, actor=ACTOR, values=values)


def make_route(org: Organization, deployment: Deployment, model: str = "chat") -> Route:
    return route_create(
        org=org, actor=ACTOR, values={"model_name": model}, deployments=[deployment]
    )


@pytest.fixture
def setup(org: Organization) -> tuple[Provider, Deployment, Route]:
    provider = make_provider(org)
    deployment = make_deployment(provider)
    return provider, deployment, make_route(org, deployment)


@pytest.fixture
def admin(org: Organization) -> Client:
    return signed_in_as("admin", org)


def provider_post(**overrides: str) -> dict[str, str]:
    return {"name": "Anthropic", "kind": "anthropic", "base_url": "", "api_version": "",
            "api_key": "", "enabled": "on", **overrides}  # fmt: skip


def deployment_post(**overrides: str) -> dict[str, str]:
    return {
        "name": "haiku", "upstream_model": "claude-haiku-4-5", "weight": "1", "priority": "0",
        "connect_timeout_ms": "5000", "ttft_timeout_ms": "60000", "read_timeout_ms": "120000",
        "total_timeout_ms": "600000", "context_window_tokens": "", "rpm_limit": "",
        "tpm_limit": "", "enabled": "on", **overrides,
    }  # fmt: skip


def route_post(deployments: list[int], **overrides: str) -> dict[str, object]:
    return {
        "model_name": "assistant", "strategy": "priority", "deployments": deployments,
        "fallback_models": "", "max_attempts": "3", "deadline_ms": "120000",
        "max_output_tokens": "", "variant_deployment": "", "variant_percent": "0",
        "variant_sticky_by": "key", "shadow_deployment": "", "shadow_percent": "0",
        "cache_ttl_seconds": "0", "cache_hit_billing": "free", "unsupported_params": "reject",
        "enabled": "on", **overrides,
    }  # fmt: skip


# --- who may look --------------------------------------------------------------------------


def every_page(org: Organization, provider: Provider, deployment: Deployment, route: Route):
    return [
        url("dashboard:providers", org),
        url("dashboard:providers_new", org),
        url("dashboard:providers_edit", org, provider.pk),
        url("dashboard:providers_deployment_new", org, provider.pk),
        url("dashboard:providers_deployment_edit", org, deployment.pk),
        url("dashboard:providers_route_new", org),
        url("dashboard:providers_route_edit", org, route.pk),
    ]


@pytest.mark.parametrize("role", ["owner", "admin"])
def test_owners_and_admins_open_every_page(org, setup, role: str) -> None:
    client = signed_in_as(role, org)
    for page in every_page(org, *setup):
        assert client.get(page).status_code == 200, page


@pytest.mark.parametrize("role", ["finance", "member"])
def test_finance_and_members_are_refused(org, setup, role: str) -> None:
    team = TeamFactory(org=org) if role == "member" else None
    client = signed_in_as(role, org, team=team)
    for page in every_page(org, *setup):
        assert client.get(page).status_code == 403, page
    provider = setup[0]
    response = client.post(url("dashboard:providers_toggle", org, provider.pk), {"enabled": "0"})
    assert response.status_code == 403
    provider.refresh_from_db()
    assert provider.enabled


def test_visitors_who_are_not_signed_in_are_sent_to_sign_in(org, setup) -> None:
    response = Client().get(url("dashboard:providers", org))
    assert response.status_code == 302 and "next=" in response["Location"]


def test_another_organizations_objects_are_not_found(org, admin: Client) -> None:
    other = OrganizationFactory()
    provider = make_provider(other, name="Theirs")
    deployment = make_deployment(provider, name="their-mini")
    route = make_route(other, deployment, model="their-chat")
    for page in every_page(org, provider, deployment, route)[2:]:
        if "routes/new" in page:
            continue
        assert admin.get(page).status_code == 404, page
    toggles = [
        url("dashboard:providers_toggle", org, provider.pk),
        url("dashboard:providers_deployment_toggle", org, deployment.pk),
        url("dashboard:providers_route_toggle", org, route.pk),
    ]
    for toggle in toggles:
        assert admin.post(toggle, {"enabled": "0"}).status_code == 404, toggle
    assert Provider.objects.get(pk=provider.pk).enabled
    # Their org in the URL: the admin is not a member there.
    assert admin.get(url("dashboard:providers", other)).status_code == 404
    page = admin.get(url("dashboard:providers", org)).content.decode()
    assert "Theirs" not in page and "their-chat" not in page


# --- the list ------------------------------------------------------------------------------


def test_a_new_organization_is_told_to_add_its_first_provider(org, admin: Client) -> None:
    page = admin.get(url("dashboard:providers", org)).content.decode()
    assert "Providers &amp; routes" in page
    assert "Add your first provider" in page and "Built-in mock provider" in page
    assert "No routes yet" in page


def test_the_list_shows_providers_deployments_and_routes_but_never_the_key(
    org, setup, admin: Client
) -> None:
    provider, deployment, route = setup
    route.fallback_models = ["backup-model"]
    route.cache_ttl_seconds = 300
    route.save()

    response = admin.get(url("dashboard:providers", org))

    page = response.content.decode()
    assert response.status_code == 200
    assert "OpenAI" in page and "https://api.openai.com/v1" in page
    assert 'data-deployment="mini"' in page and "gpt-4o-mini" in page
    assert 'data-route="chat"' in page and "backup-model" in page and "300 s" in page
    assert "A key is stored" in page
    assert SECRET not in page and provider.api_key_encrypted not in page


def test_the_list_takes_a_fixed_number_of_queries(
    org, setup, admin: Client, django_assert_num_queries
) -> None:
    provider, deployment, _ = setup
    for n in range(3):
        extra = make_deployment(make_provider(org, name=f"P{n}"), name=f"d{n}")
        make_route(org, extra, model=f"m{n}")
    with django_assert_num_queries(9):
        assert admin.get(url("dashboard:providers", org)).status_code == 200


@pytest.fixture
def open_circuit_board(setup) -> Iterator[int]:
    """The shared health board reporting the setup's deployment with an open circuit."""
    deployment_id = setup[1].pk
    status = DeploymentStatus(
        deployment_id=deployment_id, state=CircuitState.OPEN, consecutive_failures=5,
        window_requests=8, window_failures=6, latency_ms=120.0, ttft_ms=None, in_flight=0,
        opened_at=None, retry_in_s=20.0,
    )  # fmt: skip
    with health_board_reporting([status]):
        yield deployment_id


def test_each_deployment_shows_its_live_circuit_and_error_rate(
    org, admin: Client, open_circuit_board: int
) -> None:
    page = admin.get(url("dashboard:providers", org)).content.decode()
    assert '<span class="circuit open">Open</span>' in page
    assert "75&nbsp;%" in page and "(6 of 8)" in page


# --- providers -----------------------------------------------------------------------------


def test_an_admin_adds_a_provider_with_a_write_only_key(org, admin: Client) -> None:
    form = admin.get(url("dashboard:providers_new", org)).content.decode()
    for label in ("Name", "Kind", "Base URL", "API key"):
        assert f">{label}</label>" in form
    assert "Save provider" in form and "No key stored" in form

    response = admin.post(
        url("dashboard:providers_new", org), provider_post(api_key="sk-ant-brand-new")
    )

    assert response.status_code == 302
    assert response["Location"] == url("dashboard:providers", org)
    provider = Provider.objects.get(org=org, name="Anthropic")
    assert provider.kind == "anthropic" and provider.api_key() == "sk-ant-brand-new"
    entry = AuditLog.objects.get(action="provider.create")
    assert entry.actor is not None and "sk-ant-brand-new" not in str(entry.after)
    followed = admin.get(response["Location"]).content.decode()
    assert "Provider Anthropic added." in followed and "sk-ant-brand-new" not in followed


def test_the_edit_form_never_shows_the_key_and_an_empty_field_keeps_it(
    org, setup, admin: Client
) -> None:
    provider = setup[0]
    page = admin.get(url("dashboard:providers_edit", org, provider.pk)).content.decode()
    assert "A key is stored" in page
    assert SECRET not in page and provider.api_key_encrypted not in page
    assert SECRET[-4:] not in page

    response = admin.post(
        url("dashboard:providers_edit", org, provider.pk),
        provider_post(name="OpenAI EU", kind="openai"),
    )

    assert response.status_code == 302
    provider.refresh_from_db()
    assert provider.name == "OpenAI EU" and provider.api_key() == SECRET
    entry = AuditLog.objects.get(action="provider.update")
    assert entry.after == {"name": "OpenAI EU"}


def test_a_new_key_replaces_the_stored_one(org, setup, admin: Client) -> None:
    provider = setup[0]
    admin.post(
        url("dashboard:providers_edit", org, provider.pk),
        provider_post(name="OpenAI", kind="openai", api_key="sk-rotated"),
    )
    provider.refresh_from_db()
    assert provider.api_key() == "sk-rotated"
    assert AuditLog.objects.get(action="provider.update").after == {"api_key": "changed"}


def test_invalid_provider_input_is_shown_beside_the_field(org, admin: Client, settings) -> None:
    settings.TOLLGATE_PROVIDER_ALLOW_PRIVATE_NETWORKS = False
    response = admin.post(
        url("dashboard:providers_new", org),
        provider_post(kind="openai_compatible", base_url="http://169.254.169.254/latest",
                      api_key="sk-typed"),
    )  # fmt: skip
    page = response.content.decode()
    assert response.status_code == 200
    assert "private or local network" in page
    assert "sk-typed" not in page, "a typed key is not echoed back"
    azure = admin.post(url("dashboard:providers_new", org), provider_post(kind="azure"))
    assert "This kind of provider needs a base URL." in azure.content.decode()
    assert not Provider.objects.filter(org=org).exists()


def test_disabling_a_provider_is_a_post_that_is_audited(org, setup, admin: Client) -> None:
    provider = setup[0]
    assert admin.get(url("dashboard:providers_toggle", org, provider.pk)).status_code == 405

    response = admin.post(url("dashboard:providers_toggle", org, provider.pk), {"enabled": "0"})

    assert response.status_code == 302
    provider.refresh_from_db()
    assert provider.enabled is False
    assert AuditLog.objects.get(action="provider.update").after == {"enabled": False}
    page = admin.get(url("dashboard:providers", org)).content.decode()
    assert "Provider OpenAI disabled." in page and ">Enable<" in page


# --- deployments ---------------------------------------------------------------------------


def test_an_admin_adds_and_edits_a_deployment(org, setup, admin: Client) -> None:
    provider = setup[0]
    response = admin.post(
        url("dashboard:providers_deployment_new", org, provider.pk),
        deployment_post(rpm_limit="100"),
    )
    assert response.status_code == 302
    deployment = Deployment.objects.get(provider=provider, name="haiku")
    assert deployment.rpm_limit == 100

    response = admin.post(
        url("dashboard:providers_deployment_edit", org, deployment.pk),
        deployment_post(weight="4", read_timeout_ms="30000"),
    )
    assert response.status_code == 302
    deployment.refresh_from_db()
    assert (deployment.weight, deployment.read_timeout_ms) == (4, 30_000)
    assert AuditLog.objects.filter(action__startswith="deployment.").count() == 3


def test_a_duplicate_deployment_name_is_an_error_on_the_form(org, setup, admin: Client) -> None:
    provider = setup[0]
    response = admin.post(
        url("dashboard:providers_deployment_new", org, provider.pk), deployment_post(name="mini")
    )
    assert response.status_code == 200
    assert "already exists" in response.content.decode()
    assert provider.deployments.count() == 1


# --- routes --------------------------------------------------------------------------------


def test_an_admin_adds_a_route_over_the_orgs_deployments(org, setup, admin: Client) -> None:
    _, deployment, _ = setup
    form = admin.get(url("dashboard:providers_route_new", org)).content.decode()
    assert 'type="checkbox" name="deployments"' in form and "mini (OpenAI" in form

    response = admin.post(
        url("dashboard:providers_route_new", org),
        route_post([deployment.pk], fallback_models="chat, other", cache_ttl_seconds="60",
                   shadow_deployment=str(deployment.pk), shadow_percent="5"),
    )  # fmt: skip

    assert response.status_code == 302
    route = Route.objects.get(org=org, model_name="assistant")
    assert list(route.deployments.all()) == [deployment]
    assert route.fallback_models == ["chat", "other"]
    assert (route.cache_ttl_seconds, route.shadow_deployment, route.shadow_percent) == (
        60,
        deployment,
        5,
    )
    entry = AuditLog.objects.get(action="route.create", target_id=str(route.pk))
    assert entry.after["deployments"] == ["mini"]


def test_a_forged_deployment_of_another_org_is_rejected(org, setup, admin: Client) -> None:
    _, deployment, route = setup
    theirs = make_deployment(make_provider(OrganizationFactory(), name="Theirs"), name="theirs")
    offered = admin.get(url("dashboard:providers_route_new", org)).content.decode()
    assert "theirs" not in offered

    created = admin.post(
        url("dashboard:providers_route_new", org), route_post([deployment.pk, theirs.pk])
    )
    edited = admin.post(
        url("dashboard:providers_route_edit", org, route.pk),
        route_post([deployment.pk], model_name="chat", variant_deployment=str(theirs.pk),
                   variant_percent="50"),
    )  # fmt: skip

    for response in (created, edited):
        assert response.status_code == 200
        assert "Select a valid choice" in response.content.decode()
    assert not Route.objects.filter(model_name="assistant").exists()
    route.refresh_from_db()
    assert route.variant_deployment is None and route.variant_percent == 0


def test_a_taken_route_name_and_bad_percentages_are_form_errors(org, setup, admin: Client) -> None:
    _, deployment, _ = setup
    taken = admin.post(
        url("dashboard:providers_route_new", org), route_post([deployment.pk], model_name="chat")
    )
    assert "This organization already has a route named chat." in taken.content.decode()
    too_much = admin.post(
        url("dashboard:providers_route_new", org), route_post([deployment.pk], shadow_percent="150")
    )
    assert too_much.status_code == 200
    assert Route.objects.filter(org=org).count() == 1


def test_disabling_a_route_and_a_deployment(org, setup, admin: Client) -> None:
    _, deployment, route = setup
    admin.post(url("dashboard:providers_route_toggle", org, route.pk), {"enabled": "0"})
    admin.post(url("dashboard:providers_deployment_toggle", org, deployment.pk), {"enabled": "0"})
    route.refresh_from_db()
    deployment.refresh_from_db()
    assert route.enabled is False and deployment.enabled is False
    admin.post(url("dashboard:providers_route_toggle", org, route.pk), {"enabled": "1"})
    route.refresh_from_db()
    assert route.enabled is True
    assert AuditLog.objects.filter(action="route.update").count() == 2
