"""The audit log becomes append-only in the database: triggers refuse UPDATE and DELETE
(TRUNCATE too on PostgreSQL) on tenants_auditlog, except a deleted user's actor_id being
set to NULL and `manage.py flush` on its own connection. See tenants/audit_guard.py."""

from typing import Any

from django.db import migrations

from tenants import audit_guard


def forwards(apps: Any, schema_editor: Any) -> None:
    audit_guard.install(schema_editor)


def backwards(apps: Any, schema_editor: Any) -> None:
    audit_guard.uninstall(schema_editor)


class Migration(migrations.Migration):
    dependencies = [("tenants", "0005_api_tokens")]

    operations: list[migrations.operations.base.Operation] = [
        migrations.RunPython(forwards, backwards, elidable=False),
    ]
