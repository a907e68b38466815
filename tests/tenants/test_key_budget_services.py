"""Editing, rotating and budgeting keys; editing and deleting budgets; their audit trail."""

import json
from datetime import timedelta

import pytest
from django.core.exceptions import ValidationError
from django.utils import timezone

from tenants.keys import key_matches
from tenants.models import AuditLog, Budget, Organization, Team, VirtualKey
from tenants.services import (
    budget_create,
    budget_delete,
    budget_update,
    virtual_key_issue,
    virtual_key_revoke,
    virtual_key_rotate,
    virtual_key_update,
)
from tests.conftest import TEST_ACTOR

pytestmark = pytest.mark.django_db
USD = 10**9


def last_audit(action: str) -> AuditLog:
    return AuditLog.objects.filter(action=action).latest("pk")


def test_a_key_issued_with_a_monthly_budget_gets_a_hard_monthly_budget_of_its_own(
    org: Organization,
) -> None:
    key = virtual_key_issue(org=org, name="ci", actor=TEST_ACTOR, monthly_budget_nanos=25 * USD).key
    budget = Budget.objects.get(key=key)
    assert (budget.scope, budget.period, budget.enforcement, budget.limit_nanos) == (
        "key", "monthly", "hard", 25 * USD,
    )  # fmt: skip
    assert last_audit("budget.create").target_id == str(budget.pk)


def test_a_key_whose_budget_is_refused_is_not_created_either(org: Organization) -> None:
    with pytest.raises(ValidationError):
        virtual_key_issue(org=org, name="ci", actor=TEST_ACTOR, monthly_budget_nanos=0)
    assert not VirtualKey.objects.exists()


def test_updating_a_key_changes_its_settings_and_audits_only_what_changed(
    org: Organization,
) -> None:
    key = virtual_key_issue(org=org, name="ci", actor=TEST_ACTOR, rpm_limit=10).key
    expires_at = timezone.now() + timedelta(days=30)
    virtual_key_update(
        key=key, actor=TEST_ACTOR, name="ci bot", allowed_models=["b", "a", "a"],
        rpm_limit=10, tpm_limit=5000, expires_at=expires_at,
    )  # fmt: skip
    key.refresh_from_db()
    assert (key.name, key.allowed_models, key.rpm_limit, key.tpm_limit) == (
        "ci bot", ["a", "b"], 10, 5000,
    )  # fmt: skip
    assert key.expires_at == expires_at
    entry = last_audit("virtual_key.update")
    assert entry.before == {
        "name": "ci",
        "allowed_models": [],
        "tpm_limit": None,
        "expires_at": None,
    }
    assert entry.after["name"] == "ci bot" and "rpm_limit" not in entry.after
    assert key.secret_hash not in json.dumps([entry.before, entry.after])


def test_an_update_that_changes_nothing_writes_no_audit_entry(org: Organization) -> None:
    key = virtual_key_issue(org=org, name="ci", actor=TEST_ACTOR).key
    virtual_key_update(
        key=key, actor=TEST_ACTOR, name="ci", allowed_models=[], rpm_limit=None, tpm_limit=None,
        expires_at=None,
    )  # fmt: skip
    assert not AuditLog.objects.filter(action="virtual_key.update").exists()


def test_a_revoked_key_can_be_neither_edited_nor_rotated(org: Organization) -> None:
    key = virtual_key_issue(org=org, name="ci", actor=TEST_ACTOR).key
    virtual_key_revoke(key=key, actor=TEST_ACTOR)
    with pytest.raises(ValidationError):
        virtual_key_update(
            key=key, actor=TEST_ACTOR, name="x", allowed_models=[], rpm_limit=None,
            tpm_limit=None, expires_at=None,
        )  # fmt: skip
    with pytest.raises(ValidationError):
        virtual_key_rotate(key=key, actor=TEST_ACTOR)
    key.refresh_from_db()
    assert key.name == "ci"


def test_rotating_a_key_replaces_its_secret_and_keeps_the_record_and_its_budgets(
    org: Organization, team: Team
) -> None:
    old = virtual_key_issue(
        org=org, name="ci", team=team, actor=TEST_ACTOR, monthly_budget_nanos=USD
    )
    new = virtual_key_rotate(key=old.key, actor=TEST_ACTOR)
    key = VirtualKey.objects.get(pk=old.key.pk)
    assert new.key.pk == key.pk and new.plaintext != old.plaintext
    assert key.prefix == new.key.prefix != old.key.prefix
    assert key_matches(new.plaintext, key.secret_hash)
    assert not key_matches(old.plaintext, key.secret_hash)
    assert key.budgets.count() == 1 and key.team == team and key.name == "ci"
    entry = last_audit("virtual_key.rotate")
    assert (entry.before, entry.after) == ({"prefix": old.key.prefix}, {"prefix": key.prefix})


def test_updating_a_budget_audits_before_and_after(org: Organization) -> None:
    budget = budget_create(org=org, scope="org", limit_nanos=10 * USD, actor=TEST_ACTOR)
    budget_update(
        budget=budget, actor=TEST_ACTOR, period="weekly", limit_nanos=20 * USD,
        enforcement="soft", soft_thresholds=[90],
    )  # fmt: skip
    budget.refresh_from_db()
    assert (budget.period, budget.limit_nanos, budget.enforcement, budget.soft_thresholds) == (
        "weekly", 20 * USD, "soft", [90],
    )  # fmt: skip
    entry = last_audit("budget.update")
    assert entry.before == {
        "period": "monthly", "limit_nanos": 10 * USD, "enforcement": "hard",
        "soft_thresholds": [50, 80, 100],
    }  # fmt: skip
    assert entry.after == {
        "period": "weekly",
        "limit_nanos": 20 * USD,
        "enforcement": "soft",
        "soft_thresholds": [90],
    }


def test_a_budget_update_with_a_bad_threshold_is_refused(org: Organization) -> None:
    budget = budget_create(org=org, scope="org", limit_nanos=USD, actor=TEST_ACTOR)
    with pytest.raises(ValidationError):
        budget_update(
            budget=budget, actor=TEST_ACTOR, period="monthly", limit_nanos=USD,
            enforcement="hard", soft_thresholds=[150],
        )  # fmt: skip
    assert Budget.objects.get(pk=budget.pk).soft_thresholds == [50, 80, 100]


def test_deleting_a_budget_removes_it_and_audits_what_it_was(org: Organization, team: Team) -> None:
    budget = budget_create(org=org, scope="team", team=team, limit_nanos=USD, actor=TEST_ACTOR)
    budget_delete(budget=budget, actor=TEST_ACTOR)
    assert not Budget.objects.filter(pk=budget.pk).exists()
    entry = last_audit("budget.delete")
    assert entry.target_id == str(budget.pk) and entry.after is None
    assert entry.before["scope"] == "team" and entry.before["limit_nanos"] == USD
