"""The audit log page: who changed what, newest first, filtered, paged, escaped."""

from datetime import UTC, datetime, timedelta

import pytest
from django.urls import reverse

from tenants.models import AuditLog, Membership, Organization
from tests.factories import OrganizationFactory, UserFactory
from tests.support.dashboard import signed_in_as

pytestmark = pytest.mark.django_db
NOON = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)


@pytest.fixture
def org() -> Organization:
    return OrganizationFactory(name="Acme", time_zone="Europe/Berlin")


def entry(org: Organization, action: str = "budget.create", **fields: object) -> AuditLog:
    values = {"target_type": "tenants.budget", "target_id": "1", "created_at": NOON, **fields}
    return AuditLog.objects.create(org=org, action=action, **values)


def audit_url(org: Organization, **query: str) -> str:
    params = "&".join(f"{key}={value}" for key, value in {"org": org.slug, **query}.items())
    return f"{reverse('dashboard:audit')}?{params}"


@pytest.mark.parametrize(
    ("role", "status"), [("owner", 200), ("admin", 200), ("finance", 200), ("member", 403)]
)
def test_the_audit_log_is_for_owners_admins_and_finance(
    org: Organization, role: str, status: int
) -> None:
    assert signed_in_as(role, org).get(audit_url(org)).status_code == status


def test_entries_show_who_when_in_the_org_zone_and_only_what_changed(org: Organization) -> None:
    ada = UserFactory(username="ada")
    entry(
        org, "organization.update", actor=ada, target_type="tenants.organization",
        before={"name": "Acme", "time_zone": "UTC"},
        after={"name": "<script>alert(1)</script>", "time_zone": "UTC"},
    )  # fmt: skip
    entry(org, "virtual_key.revoke", actor_label="cli", created_at=NOON - timedelta(hours=1))
    entry(OrganizationFactory(), "team.create", actor_label="elsewhere")
    page = signed_in_as("finance", org).get(audit_url(org)).content.decode()
    assert 'id="audit-log"' in page
    newest, older = "<code>organization.update</code>", "<code>virtual_key.revoke</code>"
    assert page.index(newest) < page.index(older)  # newest first
    assert "2026-11-20 13:00:00" in page  # noon UTC in Berlin
    assert "ada" in page and "cli" in page and "elsewhere" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "<script>alert(1)" not in page
    assert '<th scope="row">name</th>' in page and '<th scope="row">time_zone</th>' not in page


def test_secret_looking_fields_are_masked_even_if_a_service_recorded_one(
    org: Organization,
) -> None:
    entry(org, "provider.update", after={"api_key": "sk-live-123", "name": "openai"})
    page = signed_in_as("owner", org).get(audit_url(org)).content.decode()
    assert "sk-live-123" not in page and "(hidden)" in page and "openai" in page


def test_filters_by_action_actor_target_and_dates(org: Organization) -> None:
    ada = UserFactory(username="ada")
    Membership.objects.create(user=ada, org=org, role="admin")
    entry(org, "membership.change", actor=ada, target_type="tenants.membership", target_id="7")
    entry(org, "budget.create", actor_label="cli", created_at=NOON - timedelta(days=3))
    client = signed_in_as("owner", org)

    def shown(**query: str) -> list[str]:
        rows = client.get(audit_url(org, **query)).context["rows"]
        return [row["entry"].action for row in rows]

    assert shown() == ["membership.change", "budget.create"]
    assert shown(action="membership") == ["membership.change"]
    assert shown(actor=str(ada.pk)) == ["membership.change"]
    assert shown(actor="system") == ["budget.create"]
    assert shown(target_type="tenants.budget") == ["budget.create"]
    assert shown(since="2026-11-19") == ["membership.change"]
    assert shown(until="2026-11-18") == ["budget.create"]
    response = client.get(audit_url(org, since="yesterday"))
    assert response.status_code == 200 and "YYYY-MM-DD" in response.content.decode()


def test_pages_walk_back_through_every_entry_once(
    org: Organization, django_assert_max_num_queries
) -> None:
    AuditLog.objects.bulk_create(
        [
            AuditLog(org=org, action=f"budget.n{i}", target_type="tenants.budget", target_id=str(i),
                     created_at=NOON - timedelta(minutes=i // 2))  # pairs share a time
            for i in range(120)
        ]
    )  # fmt: skip
    client = signed_in_as("admin", org)
    seen, next_url = [], audit_url(org)
    while next_url:
        with django_assert_max_num_queries(8):
            response = client.get(next_url)
        seen += [row["entry"].action for row in response.context["rows"]]
        next_url = response.context["older_url"]
    assert len(seen) == 120 and len(set(seen)) == 120
    assert response.context["first_page"] is False and "End of the log" in response.content.decode()


def test_an_empty_log_says_what_will_appear(org: Organization) -> None:
    page = signed_in_as("owner", org).get(audit_url(org)).content.decode()
    assert "Nothing recorded yet" in page
