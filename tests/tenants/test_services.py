"""Tenant writes: keys, organizations, memberships and budgets, with their audit trail."""

import uuid
from datetime import timedelta
from typing import Any

import pytest
from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction
from django.db.models import Model
from django.utils import timezone
from pytest_django import DjangoCaptureOnCommitCallbacks

from billing.contracts import UsageRecord
from billing.ingest import usage_events_write
from tenants.config import config_revision_get
from tenants.keys import key_matches, key_prefix
from tenants.models import AuditLog, Budget, Membership, Organization, Team, VirtualKey
from tenants.services import (
    budget_create,
    membership_set,
    organization_create,
    virtual_key_issue,
    virtual_key_revoke,
)
from tests.conftest import TEST_ACTOR
from tests.factories import OrganizationFactory, TeamFactory, UserFactory

pytestmark = pytest.mark.django_db


def stored_values(instance: Model) -> dict[str, Any]:
    """Every column of `instance` as read back from the database."""
    return type(instance).objects.filter(pk=instance.pk).values().get()


def issue(org: Organization, **fields: Any) -> VirtualKey:
    return virtual_key_issue(org=org, name=fields.pop("name", "k"), actor=TEST_ACTOR, **fields).key


# ---------------------------------------------------------------- virtual_key_issue


def test_issued_key_stores_only_the_hash_and_the_visible_prefix(
    org: Organization, team: Team
) -> None:
    issued = virtual_key_issue(
        org=org,
        team=team,
        name="ci",
        actor=TEST_ACTOR,
        allowed_models=["gpt-b", "gpt-a", "gpt-b"],
        metadata={"purpose": "ci"},
    )
    secret_part = issued.plaintext[len(issued.key.prefix) :]
    key_row = stored_values(issued.key)
    audit_row = AuditLog.objects.filter(target_id=str(issued.key.pk)).values().get()

    assert key_row["prefix"] == key_prefix(issued.plaintext)
    assert key_matches(issued.plaintext, key_row["secret_hash"])
    assert key_row["allowed_models"] == ["gpt-a", "gpt-b"]
    for row in (key_row, audit_row):
        for column, value in row.items():
            assert issued.plaintext not in str(value), column
            assert secret_part not in str(value), column


def test_issuing_a_key_writes_an_audit_entry_without_secrets(org: Organization, team: Team) -> None:
    issued = virtual_key_issue(org=org, team=team, name="ci", actor=TEST_ACTOR)

    entry = AuditLog.objects.get()
    assert entry.action == "virtual_key.issue"
    assert entry.actor_label == "tests"
    assert entry.org == org
    assert (entry.target_type, entry.target_id) == ("tenants.virtualkey", str(issued.key.pk))
    assert entry.before is None
    assert entry.after["prefix"] == issued.key.prefix
    assert entry.after["team"] == team.slug
    for secret in (issued.plaintext, issued.key.secret_hash):
        assert secret not in str(entry.before)
        assert secret not in str(entry.after)


def test_issued_key_is_active(org: Organization) -> None:
    key = issue(org)

    assert key.is_active
    assert VirtualKey.objects.active().filter(pk=key.pk).exists()


def test_key_for_a_team_of_another_org_is_refused_and_nothing_is_written(
    org: Organization,
) -> None:
    foreign_team = TeamFactory(org=OrganizationFactory())

    with pytest.raises(ValidationError) as excinfo:
        virtual_key_issue(org=org, team=foreign_team, name="ci", actor=TEST_ACTOR)

    assert "team" in excinfo.value.message_dict
    assert not VirtualKey.objects.exists()
    assert not AuditLog.objects.exists()


# ---------------------------------------------------------------- virtual_key_revoke


def test_revoking_a_key_sets_revoked_at_and_audits(org: Organization) -> None:
    key = issue(org)

    virtual_key_revoke(key=key, actor=TEST_ACTOR)

    stored = VirtualKey.objects.get(pk=key.pk)
    assert stored.revoked_at is not None
    assert not stored.is_active
    entry = AuditLog.objects.get(action="virtual_key.revoke")
    assert entry.actor_label == "tests"
    assert entry.target_id == str(key.pk)
    assert entry.before == {"revoked_at": None}
    assert entry.after == {"revoked_at": stored.revoked_at.isoformat()}


def test_revoking_a_revoked_key_again_changes_nothing(org: Organization) -> None:
    key = issue(org)
    virtual_key_revoke(key=key, actor=TEST_ACTOR)
    first_revoked_at = VirtualKey.objects.get(pk=key.pk).revoked_at

    virtual_key_revoke(key=VirtualKey.objects.get(pk=key.pk), actor=TEST_ACTOR)

    assert VirtualKey.objects.get(pk=key.pk).revoked_at == first_revoked_at
    assert AuditLog.objects.filter(action="virtual_key.revoke").count() == 1


def test_revoking_through_a_stale_copy_of_a_revoked_key_changes_nothing(
    org: Organization,
) -> None:
    key = issue(org)
    stale_copy = VirtualKey.objects.get(pk=key.pk)
    virtual_key_revoke(key=key, actor=TEST_ACTOR)
    first_revoked_at = VirtualKey.objects.get(pk=key.pk).revoked_at

    virtual_key_revoke(key=stale_copy, actor=TEST_ACTOR)

    assert AuditLog.objects.filter(action="virtual_key.revoke").count() == 1
    assert VirtualKey.objects.get(pk=key.pk).revoked_at == first_revoked_at


# ---------------------------------------------------------------- active keys


def test_active_keys_exclude_revoked_and_expired_keys(org: Organization) -> None:
    now = timezone.now()
    plain = issue(org, name="plain")
    expires_later = issue(org, name="later", expires_at=now + timedelta(days=1))
    expired = issue(org, name="expired", expires_at=now - timedelta(seconds=1))
    revoked = issue(org, name="revoked")
    virtual_key_revoke(key=revoked, actor=TEST_ACTOR)

    active = set(VirtualKey.objects.active().values_list("pk", flat=True))

    assert active == {plain.pk, expires_later.pk}
    assert not VirtualKey.objects.get(pk=expired.pk).is_active


# ---------------------------------------------------------------- organizations and members


def test_organization_with_an_unknown_time_zone_is_refused(db: None) -> None:
    with pytest.raises(ValidationError) as excinfo:
        organization_create(slug="acme", name="Acme", time_zone="Mars/Olympus", actor=TEST_ACTOR)

    assert "time_zone" in excinfo.value.message_dict
    assert not Organization.objects.filter(slug="acme").exists()
    assert not AuditLog.objects.exists()


def test_organization_with_an_iana_time_zone_is_created_and_audited(db: None) -> None:
    org = organization_create(slug="acme", name="Acme", time_zone="Europe/Berlin", actor=TEST_ACTOR)

    assert Organization.objects.get(slug="acme").time_zone == "Europe/Berlin"
    entry = AuditLog.objects.get(action="organization.create")
    assert entry.org == org


def test_membership_is_created_then_its_role_updated_with_audited_before_and_after(
    org: Organization, team: Team
) -> None:
    user = UserFactory()

    membership_set(org=org, user=user, role=Membership.Role.MEMBER, team=team, actor=TEST_ACTOR)
    membership_set(org=org, user=user, role=Membership.Role.ADMIN, actor=TEST_ACTOR)

    membership = Membership.objects.get(org=org, user=user)
    assert membership.role == Membership.Role.ADMIN
    assert membership.team is None
    created, updated = AuditLog.objects.filter(action="membership.set").order_by("pk")
    assert created.before is None
    assert created.after == {"user": str(user), "role": "member", "team": team.slug}
    assert updated.before == {"role": "member"}
    assert updated.after == {"user": str(user), "role": "admin", "team": None}
    assert created.target_id == updated.target_id == str(membership.pk)


def test_membership_with_a_team_of_another_org_is_refused(org: Organization) -> None:
    foreign_team = TeamFactory(org=OrganizationFactory())

    with pytest.raises(ValidationError):
        membership_set(
            org=org, user=UserFactory(), role=Membership.Role.MEMBER, team=foreign_team,
            actor=TEST_ACTOR,
        )  # fmt: skip

    assert not Membership.objects.exists()
    assert not AuditLog.objects.exists()


# ---------------------------------------------------------------- budgets


def test_team_budget_is_created_and_audited(org: Organization, team: Team) -> None:
    budget = budget_create(
        org=org, scope=Budget.Scope.TEAM, team=team, limit_nanos=5 * 10**9, actor=TEST_ACTOR
    )

    assert Budget.objects.get().pk == budget.pk
    assert AuditLog.objects.get(action="budget.create").after["limit_nanos"] == 5 * 10**9


@pytest.mark.parametrize(
    ("scope", "target"),
    [
        pytest.param(Budget.Scope.TEAM, None, id="team-scope-without-team"),
        pytest.param(Budget.Scope.KEY, None, id="key-scope-without-key"),
        pytest.param(Budget.Scope.ORG, "team", id="org-scope-with-a-team"),
        pytest.param(Budget.Scope.KEY, "team", id="key-scope-with-a-team"),
    ],
)
def test_budget_whose_target_does_not_match_its_scope_is_refused(
    org: Organization, team: Team, scope: str, target: str | None
) -> None:
    with pytest.raises(ValidationError):
        budget_create(
            org=org,
            scope=scope,
            team=team if target == "team" else None,
            limit_nanos=10**9,
            actor=TEST_ACTOR,
        )

    assert not Budget.objects.exists()
    assert not AuditLog.objects.exists()


@pytest.mark.parametrize("limit_nanos", [0, -1])
def test_budget_limit_must_be_positive(org: Organization, limit_nanos: int) -> None:
    with pytest.raises(ValidationError):
        budget_create(org=org, scope=Budget.Scope.ORG, limit_nanos=limit_nanos, actor=TEST_ACTOR)

    assert not Budget.objects.exists()


def test_budget_on_a_team_of_another_org_is_refused(org: Organization) -> None:
    foreign_team = TeamFactory(org=OrganizationFactory())

    with pytest.raises(ValidationError):
        budget_create(
            org=org, scope=Budget.Scope.TEAM, team=foreign_team, limit_nanos=10**9,
            actor=TEST_ACTOR,
        )  # fmt: skip

    assert not Budget.objects.exists()


def test_database_refuses_a_team_budget_without_a_team_written_past_the_service(
    org: Organization,
) -> None:
    with pytest.raises(IntegrityError), transaction.atomic():
        Budget.objects.create(org=org, scope=Budget.Scope.TEAM, limit_nanos=10**9)


# ---------------------------------------------------------------- configuration revision


def test_config_revision_changes_when_a_key_is_issued(
    org: Organization, django_capture_on_commit_callbacks: DjangoCaptureOnCommitCallbacks
) -> None:
    before = config_revision_get()

    with django_capture_on_commit_callbacks(execute=True):
        issue(org)

    assert config_revision_get() not in ("", before)


def test_config_revision_changes_when_a_key_is_revoked(
    org: Organization, django_capture_on_commit_callbacks: DjangoCaptureOnCommitCallbacks
) -> None:
    with django_capture_on_commit_callbacks(execute=True):
        key = issue(org)
    before = config_revision_get()

    with django_capture_on_commit_callbacks(execute=True):
        virtual_key_revoke(key=key, actor=TEST_ACTOR)

    assert config_revision_get() != before


def test_recording_usage_updates_last_used_at_without_changing_the_config_revision(
    org: Organization,
    team: Team,
    django_capture_on_commit_callbacks: DjangoCaptureOnCommitCallbacks,
) -> None:
    with django_capture_on_commit_callbacks(execute=True):
        key = issue(org, team=team)
    before = config_revision_get()
    finished_at = timezone.now()
    record = UsageRecord(
        event_id=uuid.uuid4(),
        org_id=org.pk,
        team_id=team.pk,
        key_id=key.pk,
        endpoint="chat.completions",
        model="m",
        outcome="success",
        status_code=200,
        started_at=finished_at - timedelta(milliseconds=250),
        finished_at=finished_at,
    )

    with django_capture_on_commit_callbacks(execute=True):
        usage_events_write([record])

    assert VirtualKey.objects.get(pk=key.pk).last_used_at == finished_at
    assert config_revision_get() == before
