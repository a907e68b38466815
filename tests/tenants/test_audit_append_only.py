"""The audit log is append-only in the database: no client can change or delete an entry."""

import pytest
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.db import IntegrityError, connection, models, transaction
from django.test import Client
from django.urls import reverse

from routing.models import Provider
from tenants.models import AuditLog, AuditLogImmutable
from tenants.services import Actor, team_create
from tests.factories import TeamFactory, UserFactory

TABLE = AuditLog._meta.db_table


@pytest.fixture
def entry(org) -> AuditLog:
    team_create(org=org, slug="search", name="Search", actor=Actor(label="cli"))
    return AuditLog.objects.get(action="team.create")


def refused(sql: str, *params: object) -> str:
    """Run `sql`; return the database's refusal (the test fails if it is accepted)."""
    with pytest.raises(IntegrityError) as raised, transaction.atomic(), connection.cursor() as cur:
        cur.execute(sql, params)
    return str(raised.value)


@pytest.mark.django_db
def test_raw_sql_update_and_delete_are_refused_by_the_database(entry: AuditLog) -> None:
    assert "append-only" in refused(f"UPDATE {TABLE} SET action = 'forged' WHERE id = %s", entry.pk)
    assert "append-only" in refused(f"UPDATE {TABLE} SET after = NULL")
    assert "append-only" in refused(f"DELETE FROM {TABLE} WHERE id = %s", entry.pk)
    assert "append-only" in refused(f"DELETE FROM {TABLE}")
    entry.refresh_from_db()
    assert entry.action == "team.create" and entry.after["slug"] == "search"


@pytest.mark.django_db
def test_truncate_is_refused_on_postgresql(entry: AuditLog) -> None:
    if connection.vendor != "postgresql":
        pytest.skip("SQLite has no TRUNCATE (a DELETE without WHERE, refused above)")
    with connection.cursor() as cursor:
        cursor.execute("SET CONSTRAINTS ALL IMMEDIATE")  # else the insert's checks are pending
    assert "append-only" in refused(f"TRUNCATE {TABLE}")
    assert AuditLog.objects.filter(pk=entry.pk).exists()


@pytest.mark.django_db
def test_the_orm_cannot_change_or_delete_an_entry(entry: AuditLog) -> None:
    entry.action = "forged"
    with pytest.raises(AuditLogImmutable):
        entry.save()
    with pytest.raises(AuditLogImmutable):
        entry.delete()
    with pytest.raises(AuditLogImmutable):
        AuditLog.objects.filter(pk=entry.pk).update(action="forged")
    with pytest.raises(AuditLogImmutable):
        AuditLog.objects.all().delete()
    # A plain QuerySet skips the model's guard: the database still refuses.
    plain = models.QuerySet(AuditLog).filter(pk=entry.pk)
    with pytest.raises(IntegrityError), transaction.atomic():
        plain.update(action="forged")
    with pytest.raises(IntegrityError), transaction.atomic():
        plain._raw_delete(plain.db)
    assert AuditLog.objects.get(pk=entry.pk).action == "team.create"


@pytest.mark.django_db
def test_deleting_a_user_keeps_their_entries_under_their_name(org) -> None:
    user = UserFactory(username="ann.lee")
    team_create(org=org, slug="search", name="Search", actor=Actor(user=user))
    get_user_model().objects.filter(pk=user.pk).delete()
    entry = AuditLog.objects.get(action="team.create")
    assert entry.actor_id is None and entry.actor_label == "ann.lee"
    # Only that change gets through: clearing the actor while changing anything else fails.
    other = UserFactory(username="bob")
    team_create(org=org, slug="ads", name="Ads", actor=Actor(user=other))
    forged = AuditLog.objects.get(action="team.create", actor=other)
    refused(f"UPDATE {TABLE} SET actor_id = NULL, action = 'forged' WHERE id = %s", forged.pk)


@pytest.mark.django_db(transaction=True)
def test_flush_empties_the_log_and_leaves_it_guarded(org) -> None:
    team_create(org=org, slug="search", name="Search", actor=Actor(label="cli"))
    assert AuditLog.objects.exists()
    call_command("flush", interactive=False, verbosity=0)
    assert not AuditLog.objects.exists()
    # The permission was flush's own: afterwards deletes are refused again.
    entry = AuditLog.objects.create(action="x.y", target_type="t", target_id="1")
    refused(f"DELETE FROM {TABLE} WHERE id = %s", entry.pk)
    assert AuditLog.objects.filter(pk=entry.pk).exists()


@pytest.mark.django_db
def test_changes_in_the_django_admin_are_audited_without_secrets(org) -> None:
    admin_user = UserFactory(username="root", is_staff=True, is_superuser=True)
    client = Client()
    client.force_login(admin_user)
    added = client.post(
        reverse("admin:routing_provider_add"),
        {"org": org.pk, "name": "Upstream", "kind": "openai", "base_url": "https://api.openai.com/v1",
         "enabled": "on", "api_key": "sk-admin-first-secret-31"},
    )  # fmt: skip
    assert added.status_code == 302
    provider = Provider.objects.get(name="Upstream")
    changed = client.post(
        reverse("admin:routing_provider_change", args=[provider.pk]),
        {"org": org.pk, "name": "Upstream EU", "kind": "openai",
         "base_url": "https://api.openai.com/v1", "enabled": "on",
         "api_key": "sk-admin-second-secret-47"},
    )  # fmt: skip
    assert changed.status_code == 302
    team = TeamFactory(org=org, name="Ads")
    removed = client.post(reverse("admin:tenants_team_delete", args=[team.pk]), {"post": "yes"})
    assert removed.status_code == 302

    create, update = AuditLog.objects.filter(target_type="routing.provider").order_by("pk")
    assert (create.action, create.org, create.actor) == ("provider.create", org, admin_user)
    assert create.after["name"] == "Upstream" and create.after["api_key"] == "set"
    assert update.action == "provider.update"
    assert update.before == {"name": "Upstream"}
    assert update.after == {"name": "Upstream EU", "api_key": "changed"}
    deleted = AuditLog.objects.get(action="team.delete")
    assert deleted.before["name"] == "Ads" and deleted.after is None and deleted.org == org
    everything = str(list(AuditLog.objects.values("before", "after")))
    assert "secret" not in everything and provider.api_key_encrypted[:20] not in everything
