"""The proxy's configuration snapshot: what it contains, and when it changes."""

import threading
from datetime import UTC, datetime
from decimal import Decimal

import pytest
from django.db import connections

from billing.models import ModelPrice
from routing import selectors
from routing.models import Deployment, Provider, Route
from routing.selectors import config_snapshot_load
from tenants.config import config_revision_get
from tenants.services import virtual_key_revoke
from tests.conftest import TEST_ACTOR
from tests.factories import OrganizationFactory
from tests.support.halves import production_half_only

pytestmark = pytest.mark.django_db


def provider(org=None, **fields) -> Provider:
    row = Provider(org=org, name="p", kind="mock", base_url="http://127.0.0.1:9/v1", **fields)
    row.set_api_key("sk-upstream")
    row.save()
    return row


def route(model: str, *deployments: Deployment, org=None) -> Route:
    row = Route.objects.create(org=org, model_name=model)
    row.deployments.add(*deployments)
    return row


def test_an_orgs_route_overrides_the_global_one(org) -> None:
    shared = Deployment.objects.create(provider=provider(), name="shared", upstream_model="a")
    own = Deployment.objects.create(provider=provider(org), name="own", upstream_model="b")
    route("gpt", shared)
    route("gpt", own, org=org)
    snapshot = config_snapshot_load()
    assert snapshot.route_for(org_id=org.pk, model="gpt").deployments[0].name == "own"
    other = OrganizationFactory()
    assert snapshot.route_for(org_id=other.pk, model="gpt").deployments[0].name == "shared"


def test_deployments_of_another_orgs_provider_are_never_usable(org) -> None:
    foreign = Deployment.objects.create(
        provider=provider(OrganizationFactory()), name="foreign", upstream_model="x"
    )
    route("mine", foreign, org=org)
    route("everyone", foreign)  # a global route must not lend one org's credentials
    snapshot = config_snapshot_load()
    assert snapshot.route_for(org_id=org.pk, model="mine").deployments == ()
    assert snapshot.route_for(org_id=org.pk, model="everyone").deployments == ()


def test_disabled_providers_deployments_and_routes_are_left_out(org) -> None:
    off_provider = Deployment.objects.create(
        provider=provider(enabled=False), name="off-provider", upstream_model="x"
    )
    off = Deployment.objects.create(
        provider=provider(), name="off", upstream_model="x", enabled=False
    )
    on = Deployment.objects.create(provider=provider(), name="on", upstream_model="x", priority=5)
    route("m", off_provider, off, on)
    Route.objects.create(model_name="disabled", enabled=False)
    snapshot = config_snapshot_load()
    assert [d.name for d in snapshot.route_for(org_id=org.pk, model="m").deployments] == ["on"]
    assert snapshot.route_for(org_id=org.pk, model="disabled") is None


def test_snapshot_carries_decrypted_credentials_but_never_prints_them(org) -> None:
    route("m", Deployment.objects.create(provider=provider(), name="d", upstream_model="x"))
    spec = config_snapshot_load().route_for(org_id=org.pk, model="m").deployments[0]
    assert spec.api_key == "sk-upstream"
    assert "sk-upstream" not in repr(spec)


def test_revoked_keys_leave_the_snapshot(org, issue_key) -> None:
    from tenants.models import VirtualKey

    issue_key(org, name="a")
    assert len(config_snapshot_load().keys_by_prefix) == 1
    virtual_key_revoke(key=VirtualKey.objects.get(name="a"), actor=TEST_ACTOR)
    assert config_snapshot_load().keys_by_prefix == {}


def test_org_price_override_wins(org) -> None:
    start = datetime(2024, 1, 1, tzinfo=UTC)
    ModelPrice.objects.create(
        provider_kind="mock",
        model="x",
        input_usd_per_mtok=Decimal("1"),
        output_usd_per_mtok=Decimal("2"),
        effective_from=start,
    )
    ModelPrice.objects.create(org=org, provider_kind="mock", model="x",
                              input_usd_per_mtok=Decimal("0.5"),
                              output_usd_per_mtok=Decimal("1"), effective_from=start)  # fmt: skip
    snapshot = config_snapshot_load()
    now = datetime.now(UTC)
    assert snapshot.price_for(provider_kind="mock", model="x", org_id=org.pk, moment=now).org_id
    other = OrganizationFactory()
    assert (
        snapshot.price_for(provider_kind="mock", model="x", org_id=other.pk, moment=now).org_id
        is None
    )


@pytest.mark.django_db(transaction=True)
def test_every_configuration_change_moves_the_revision(org) -> None:
    seen = {config_revision_get()}

    def changed() -> bool:
        revision = config_revision_get()
        fresh = revision not in seen
        seen.add(revision)
        return fresh

    p = provider()
    assert changed()
    d = Deployment.objects.create(provider=p, name="d", upstream_model="x")
    assert changed()
    r = Route.objects.create(model_name="m")
    assert changed()
    r.deployments.add(d)
    assert changed()
    ModelPrice.objects.create(provider_kind="mock", model="x", input_usd_per_mtok=1,
                              output_usd_per_mtok=1, effective_from=datetime.now(UTC))  # fmt: skip
    assert changed()
    p.delete()
    assert changed()


@production_half_only
@pytest.mark.django_db(transaction=True)
def test_a_route_committed_while_the_snapshot_loads_is_in_it_whole_or_not_at_all(
    org, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The loader reads deployments, then routes, in separate queries: a route and its
    deployment committed in between must not come out as a route with no deployment
    (answered 503 until the next change). PostgreSQL only: SQLite's single transaction
    is one snapshot by construction, and its test database cannot take a second writer."""
    route("existing", Deployment.objects.create(provider=provider(org), name="d0",
                                                upstream_model="a"), org=org)  # fmt: skip
    original = selectors._deployment_spec
    committed = threading.Event()

    def commit_a_route_elsewhere() -> None:
        try:
            late = Deployment.objects.create(
                provider=provider(org), name="late", upstream_model="b"
            )
            route("late", late, org=org)
        finally:
            connections.close_all()
            committed.set()

    def spec_after_a_concurrent_commit(deployment: Deployment) -> object:
        if not committed.is_set():  # between the deployments query and the routes query
            threading.Thread(target=commit_a_route_elsewhere).start()
            assert committed.wait(10)
        return original(deployment)

    monkeypatch.setattr(selectors, "_deployment_spec", spec_after_a_concurrent_commit)
    snapshot = config_snapshot_load()

    assert committed.is_set()
    late = snapshot.route_for(org_id=org.pk, model="late")
    assert late is None or [d.name for d in late.deployments] == ["late"]
    # The next load sees it whole.
    assert [
        d.name for d in config_snapshot_load().route_for(org_id=org.pk, model="late").deployments
    ] == ["late"]
