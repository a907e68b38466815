"""The audit log over the management API: read-only, org-scoped, filtered, newest first."""

from datetime import UTC, datetime
from unittest import mock

import pytest

from tenants.models import AuditLog
from tenants.services import Actor, team_create, virtual_key_issue, virtual_key_revoke
from tests.conftest import TEST_ACTOR
from tests.factories import OrganizationFactory, UserFactory
from tests.support.api import token_client

pytestmark = pytest.mark.django_db


def at(day: int) -> datetime:
    return datetime(2026, 3, day, 12, tzinfo=UTC)


@pytest.fixture
def history(org) -> dict[str, AuditLog]:
    """Three changes on three days by a user, a tool and a token, plus another org's."""
    ann = UserFactory(username="ann.lee")
    # Entries are append-only, so they are written on their days rather than back-dated.
    created_at = AuditLog._meta.get_field("created_at")
    with mock.patch.object(created_at, "_get_default", lambda: at(1)):
        team = team_create(org=org, slug="search", name="Search", actor=Actor(user=ann))
    with mock.patch.object(created_at, "_get_default", lambda: at(2)):
        key = virtual_key_issue(
            org=org, name="k", actor=Actor(label="cli", ip_address="10.0.0.7")
        ).key
    with mock.patch.object(created_at, "_get_default", lambda: at(3)):
        virtual_key_revoke(key=key, actor=Actor(label="api token tgm_Ab12Cd34"))
    virtual_key_issue(org=OrganizationFactory(), name="theirs", actor=TEST_ACTOR)
    entries = {entry.action: entry for entry in AuditLog.objects.filter(org=org)}
    assert team.pk and entries["virtual_key.issue"].created_at == at(2)
    return entries


def actions(client, **query) -> list[str]:
    response = client.get("/api/v1/audit/", query)
    assert response.status_code == 200, response.json()
    return [entry["action"] for entry in response.json()["data"]]


def test_every_role_reads_the_orgs_entries_newest_first(org, history) -> None:
    for role in ("admin", "finance", "read_only"):
        client = token_client(org, role)
        listed = client.get("/api/v1/audit/", {"target_type": "tenants.virtualkey"}).json()
        assert [entry["action"] for entry in listed["data"]] == [
            "virtual_key.revoke", "virtual_key.issue",
        ]  # fmt: skip
    issue = listed["data"][1]
    assert issue["actor"] == "cli" and issue["ip_address"] == "10.0.0.7"
    assert issue["target_id"] == history["virtual_key.issue"].target_id
    assert issue["before"] is None and issue["after"]["name"] == "k"
    assert "theirs" not in client.get("/api/v1/audit/").content.decode()


def test_entries_filter_by_action_kind_actor_and_time(org, history) -> None:
    client = token_client(org, "read_only")
    kind = ["virtual_key.revoke", "virtual_key.issue"]
    assert actions(client, action="virtual_key.") == kind
    assert actions(client, action="virtual_key") == kind
    assert actions(client, action="virtual_key.issue") == ["virtual_key.issue"]
    assert actions(client, action="virtual") == []
    assert actions(client, actor="ANN") == ["team.create"]
    assert actions(client, actor="tgm_ab12") == ["virtual_key.revoke"]
    assert actions(
        client, since=at(2).isoformat(), until=at(3).isoformat(), target_type="tenants.virtualkey"
    ) == ["virtual_key.issue"]
    # Offsets PostgreSQL would refuse are fine: the time is taken in UTC.
    assert actions(client, until="2026-03-02T23:00:00+17:00") == ["team.create"]


@pytest.mark.parametrize(
    "query",
    [
        {"since": "yesterday"},
        {"until": "9999-12-31T23:59:59-14:00"},
        {"since": "0001-01-01T00:00Z"},
    ],
)
def test_bad_times_are_a_400(org, query) -> None:
    response = token_client(org).get("/api/v1/audit/", query)
    assert response.status_code == 400
    assert response.json()["error"]["param"] in query


def test_another_orgs_entry_is_a_404_and_entries_cannot_be_changed(org, history) -> None:
    client = token_client(org)
    theirs = AuditLog.objects.exclude(org=org).first()
    assert client.get(f"/api/v1/audit/{theirs.pk}/").status_code == 404
    mine = history["team.create"]
    read = client.get(f"/api/v1/audit/{mine.pk}/")
    assert read.status_code == 200 and read.json()["actor"] == "ann.lee" and read["ETag"]
    for method in ("patch", "delete", "put", "post"):
        # Read-only for everyone: refused alike for an own and a foreign entry (no hint).
        codes = {
            getattr(client, method)(f"/api/v1/audit/{entry.pk}/", {}, format="json").status_code
            for entry in (mine, theirs)
        }
        assert codes == {405}, method
    assert client.post("/api/v1/audit/", {}, format="json").status_code == 405
    assert AuditLog.objects.filter(pk__in=[mine.pk, theirs.pk]).count() == 2
