"""Routing configuration writes: validated, org-scoped, audited without secrets, seen live."""

import json

import pytest
from django.core.exceptions import ValidationError

from routing.models import Deployment, Provider, Route
from routing.selectors import route_plans
from routing.services import (
    deployment_create,
    deployment_update,
    provider_base_url_check,
    provider_create,
    provider_update,
    route_create,
    route_update,
)
from tenants.config import config_revision_get
from tenants.models import AuditLog
from tenants.services import Actor
from tests.factories import OrganizationFactory

pytestmark = pytest.mark.django_db

ACTOR = Actor.system("tests")
SECRET = "sk-live-do-not-leak-0123456789"


def openai_values(**overrides: object) -> dict[str, object]:
    return {
        "name": "OpenAI",
        "kind": Provider.Kind.OPENAI,
        "base_url": "",
        "api_version": "",
        "enabled": True,
        **overrides,
    }


def entries(action: str) -> list[AuditLog]:
    return list(AuditLog.objects.filter(action=action).order_by("pk"))


def assert_no_secret_in_audit(provider: Provider) -> None:
    logged = json.dumps([[e.before, e.after] for e in AuditLog.objects.all()])
    assert SECRET not in logged
    assert provider.api_key_encrypted[:20] not in logged


@pytest.fixture
def provider(org) -> Provider:
    return provider_create(org=org, actor=ACTOR, values=openai_values(), api_key=SECRET)


@pytest.fixture
def deployment(provider: Provider) -> Deployment:
    return deployment_create(
        provider=provider, actor=ACTOR, values={"name": "mini", "upstream_model": "gpt-4o-mini"}
    )


def test_a_new_provider_keeps_its_key_encrypted_and_out_of_the_audit_log(org) -> None:
    provider = provider_create(org=org, actor=ACTOR, values=openai_values(), api_key=SECRET)

    provider.refresh_from_db()
    assert provider.org == org and provider.api_key() == SECRET
    assert SECRET not in provider.api_key_encrypted
    [entry] = entries("provider.create")
    assert entry.org == org and entry.actor_label == "tests"
    assert entry.after["name"] == "OpenAI" and entry.after["api_key"] == "set"
    assert_no_secret_in_audit(provider)


def test_an_empty_key_on_update_keeps_the_stored_key(provider: Provider) -> None:
    provider_update(provider=provider, actor=ACTOR, changes={"name": "OpenAI prod"}, api_key="")

    provider.refresh_from_db()
    assert provider.name == "OpenAI prod" and provider.api_key() == SECRET
    [entry] = entries("provider.update")
    assert entry.before == {"name": "OpenAI"} and entry.after == {"name": "OpenAI prod"}


def test_a_new_key_is_recorded_only_as_changed(provider: Provider) -> None:
    provider_update(provider=provider, actor=ACTOR, changes={}, api_key="sk-new-key-42")

    provider.refresh_from_db()
    assert provider.api_key() == "sk-new-key-42"
    [entry] = entries("provider.update")
    assert entry.after == {"api_key": "changed"}
    assert "sk-new-key-42" not in json.dumps(entry.after)
    assert_no_secret_in_audit(provider)


def test_a_stored_key_can_be_removed(provider: Provider) -> None:
    provider_update(provider=provider, actor=ACTOR, changes={}, remove_api_key=True)

    provider.refresh_from_db()
    assert not provider.has_api_key
    assert entries("provider.update")[0].after == {"api_key": "removed"}


def test_an_update_that_changes_nothing_leaves_no_audit_entry(provider: Provider) -> None:
    provider_update(provider=provider, actor=ACTOR, changes=openai_values())
    assert entries("provider.update") == []


def test_providers_are_validated_like_the_model_says(org) -> None:
    with pytest.raises(ValidationError) as azure:
        provider_create(
            org=org,
            actor=ACTOR,
            values=openai_values(kind=Provider.Kind.AZURE, base_url="https://x.example.com"),
        )
    assert "api_version" in azure.value.error_dict
    with pytest.raises(ValidationError) as url:
        provider_create(
            org=org, actor=ACTOR, values=openai_values(base_url="https://u:p@api.example.com/")
        )
    assert "base_url" in url.value.error_dict
    assert not Provider.objects.exists()


@pytest.mark.parametrize(
    "base_url",
    [
        "http://169.254.169.254/latest",
        "http://10.1.2.3/v1",
        "http://127.0.0.1:6379",
        "http://[::1]:8000/v1",
        "http://[::ffff:192.168.0.1]/v1",
        "http://localhost:9100/v1",
        "http://2130706433/v1",  # 127.0.0.1 spelled as one number
    ],
)
def test_an_address_on_our_own_network_is_refused(org, settings, base_url: str) -> None:
    settings.TOLLGATE_PROVIDER_ALLOW_PRIVATE_NETWORKS = False
    with pytest.raises(ValidationError) as refused:
        provider_create(org=org, actor=ACTOR, values=openai_values(base_url=base_url))
    assert "private or local network" in str(refused.value.error_dict["base_url"])
    assert not Provider.objects.exists()


def test_a_kind_whose_usual_address_is_local_is_refused_too(settings) -> None:
    settings.TOLLGATE_PROVIDER_ALLOW_PRIVATE_NETWORKS = False
    with pytest.raises(ValidationError):
        provider_base_url_check(kind=Provider.Kind.OLLAMA, base_url="")
    provider_base_url_check(kind=Provider.Kind.OPENAI, base_url="")  # public preset
    provider_base_url_check(kind=Provider.Kind.OPENAI, base_url="https://8.8.8.8/v1")


def test_local_addresses_are_allowed_when_the_operator_says_so(org, settings) -> None:
    settings.TOLLGATE_PROVIDER_ALLOW_PRIVATE_NETWORKS = True
    mock = provider_create(
        org=org,
        actor=ACTOR,
        values=openai_values(kind=Provider.Kind.MOCK, base_url="http://127.0.0.1:9100/v1"),
    )
    # Turning it off later does not re-judge an address that did not change.
    settings.TOLLGATE_PROVIDER_ALLOW_PRIVATE_NETWORKS = False
    provider_update(provider=mock, actor=ACTOR, changes={"enabled": False})
    mock.refresh_from_db()
    assert mock.enabled is False
    with pytest.raises(ValidationError):
        provider_update(provider=mock, actor=ACTOR, changes={"base_url": "http://127.0.0.2/v1"})


def test_deployments_are_validated_and_audited(provider: Provider, deployment: Deployment) -> None:
    assert entries("deployment.create")[0].after["upstream_model"] == "gpt-4o-mini"
    with pytest.raises(ValidationError):  # the name is unique within the provider
        deployment_create(
            provider=provider, actor=ACTOR, values={"name": "mini", "upstream_model": "x"}
        )
    with pytest.raises(ValidationError):
        deployment_update(deployment=deployment, actor=ACTOR, changes={"connect_timeout_ms": 0})

    deployment_update(deployment=deployment, actor=ACTOR, changes={"weight": 5, "rpm_limit": 60})

    deployment.refresh_from_db()
    assert (deployment.weight, deployment.rpm_limit, deployment.connect_timeout_ms) == (
        5,
        60,
        5_000,
    )
    [entry] = entries("deployment.update")
    assert entry.before == {"weight": 1, "rpm_limit": None}
    assert entry.after == {"weight": 5, "rpm_limit": 60}


def test_a_route_may_use_only_its_own_organizations_deployments(
    org, deployment: Deployment
) -> None:
    other = OrganizationFactory()
    theirs = deployment_create(
        provider=provider_create(org=other, actor=ACTOR, values=openai_values()),
        actor=ACTOR,
        values={"name": "theirs", "upstream_model": "gpt-4o"},
    )
    global_provider = Provider.objects.create(name="Platform", kind=Provider.Kind.OPENAI)
    platform = Deployment.objects.create(provider=global_provider, name="p", upstream_model="m")

    for forged in ({"deployments": [deployment, theirs]}, {"deployments": [platform]}):
        with pytest.raises(ValidationError) as refused:
            route_create(org=org, actor=ACTOR, values={"model_name": "chat"}, **forged)
        assert "deployments" in refused.value.error_dict
    with pytest.raises(ValidationError):
        route_create(
            org=org,
            actor=ACTOR,
            values={"model_name": "chat", "shadow_deployment": theirs, "shadow_percent": 5},
            deployments=[deployment],
        )
    assert not Route.objects.exists()


def test_a_route_name_is_unique_within_the_organization(org, deployment: Deployment) -> None:
    route_create(org=org, actor=ACTOR, values={"model_name": "chat"}, deployments=[deployment])
    with pytest.raises(ValidationError) as taken:
        route_create(org=org, actor=ACTOR, values={"model_name": "chat"}, deployments=[deployment])
    assert "already has a route named chat" in str(taken.value.error_dict["model_name"])


def test_route_changes_are_audited_with_deployment_names(org, deployment: Deployment) -> None:
    second = deployment_create(
        provider=deployment.provider,
        actor=ACTOR,
        values={"name": "big", "upstream_model": "gpt-4o"},
    )
    route = route_create(
        org=org,
        actor=ACTOR,
        values={"model_name": "chat", "fallback_models": ["backup"]},
        deployments=[deployment],
    )
    assert entries("route.create")[0].after["deployments"] == ["mini"]

    route_update(
        route=route,
        actor=ACTOR,
        changes={"variant_deployment": second, "variant_percent": 10},
        deployments=[deployment, second],
    )

    route.refresh_from_db()
    assert set(route.deployments.all()) == {deployment, second}
    [entry] = entries("route.update")
    assert entry.before == {
        "variant_deployment": None,
        "variant_percent": 0,
        "deployments": ["mini"],
    }
    assert entry.after == {
        "variant_deployment": "big",
        "variant_percent": 10,
        "deployments": ["big", "mini"],
    }
    with pytest.raises(ValidationError):
        route_update(route=route, actor=ACTOR, changes={"fallback_models": ["chat"]})


def test_configuration_changes_reach_the_proxy(
    org, provider: Provider, django_capture_on_commit_callbacks
) -> None:
    with django_capture_on_commit_callbacks(execute=True):
        deployment = deployment_create(
            provider=provider, actor=ACTOR, values={"name": "mini", "upstream_model": "m"}
        )
    before = config_revision_get()
    with django_capture_on_commit_callbacks(execute=True):
        route_create(org=org, actor=ACTOR, values={"model_name": "chat"}, deployments=[deployment])
    after_create = config_revision_get()
    assert after_create not in ("", before)
    assert route_plans()[(org.pk, "chat")].deployments[0].api_key == SECRET

    with django_capture_on_commit_callbacks(execute=True):
        provider_update(provider=provider, actor=ACTOR, changes={"enabled": False})
    assert config_revision_get() != after_create
    assert route_plans()[(org.pk, "chat")].deployments == ()
