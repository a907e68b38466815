"""The audit log is append-only in the database itself, not only in the admin and API.

Triggers on the audit table refuse UPDATE and DELETE (and TRUNCATE on PostgreSQL) from
every client: the ORM, raw SQL, a database shell. Two things still get through:

- Deleting a user sets `actor_id` to NULL on their entries (`on_delete=SET_NULL`): an
  UPDATE that changes only that is allowed; `actor_label` still names who acted.
- `manage.py flush` (and so the test suite's teardown, which flushes) empties every
  table. It marks its own connection first, `audit_purge_allowed()`: on PostgreSQL a
  transaction-local setting (`SET LOCAL tollgate.audit_purge = 'on'`), on SQLite a
  per-connection SQL function that the triggers call. No other code path sets either,
  and a client without the function (the sqlite3 shell) cannot delete at all.

This guards against mistakes and against the application's own code paths, not against
someone who owns the database: they can drop a trigger. Keep backups and, where it
matters, ship the table to write-once storage.

SQLite rebuilds a table (and drops its triggers) on many schema changes, so the SQLite
triggers are re-created, idempotently, after every `migrate` (post_migrate).
"""

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from django.db import connections, transaction
from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.migrations.recorder import MigrationRecorder

TABLE = "tenants_auditlog"
_PURGE_FUNCTION = "tollgate_audit_purge"
_PURGE_ATTRIBUTE = "tollgate_audit_purge"
REFUSED = "tenants_auditlog is append-only"

# Every column but actor_id: an UPDATE may only set actor_id to NULL (a user deleted).
_KEPT_COLUMNS = (
    "id",
    "org_id",
    "actor_label",
    "action",
    "target_type",
    "target_id",
    "before",
    "after",
    "ip_address",
    "created_at",
)

POSTGRESQL_INSTALL = f"""
CREATE OR REPLACE FUNCTION {TABLE}_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP IN ('DELETE', 'TRUNCATE')
       AND current_setting('tollgate.audit_purge', true) = 'on' THEN
        RETURN OLD;  -- manage.py flush, on its own transaction only
    END IF;
    IF TG_OP = 'UPDATE' AND OLD.actor_id IS NOT NULL AND NEW.actor_id IS NULL
       AND (to_jsonb(NEW) - 'actor_id') = (to_jsonb(OLD) - 'actor_id') THEN
        RETURN NEW;  -- the acting user was deleted; actor_label keeps the name
    END IF;
    RAISE EXCEPTION '{REFUSED}: % refused', TG_OP USING ERRCODE = 'restrict_violation';
END;
$$;
CREATE OR REPLACE TRIGGER {TABLE}_append_only_rows
    BEFORE UPDATE OR DELETE ON {TABLE}
    FOR EACH ROW EXECUTE FUNCTION {TABLE}_append_only();
CREATE OR REPLACE TRIGGER {TABLE}_append_only_truncate
    BEFORE TRUNCATE ON {TABLE}
    FOR EACH STATEMENT EXECUTE FUNCTION {TABLE}_append_only();
"""

POSTGRESQL_UNINSTALL = f"""
DROP TRIGGER IF EXISTS {TABLE}_append_only_rows ON {TABLE};
DROP TRIGGER IF EXISTS {TABLE}_append_only_truncate ON {TABLE};
DROP FUNCTION IF EXISTS {TABLE}_append_only();
"""

_only_actor_cleared = " AND ".join(
    ["OLD.actor_id IS NOT NULL", "NEW.actor_id IS NULL"]
    + [f'NEW."{column}" IS OLD."{column}"' for column in _KEPT_COLUMNS]
)
SQLITE_INSTALL = [
    f"""CREATE TRIGGER IF NOT EXISTS {TABLE}_no_update BEFORE UPDATE ON {TABLE}
    WHEN NOT ({_only_actor_cleared})
    BEGIN SELECT RAISE(ABORT, '{REFUSED}: UPDATE refused'); END""",
    f"""CREATE TRIGGER IF NOT EXISTS {TABLE}_no_delete BEFORE DELETE ON {TABLE}
    WHEN NOT {_PURGE_FUNCTION}()
    BEGIN SELECT RAISE(ABORT, '{REFUSED}: DELETE refused'); END""",
]
SQLITE_UNINSTALL = [
    f"DROP TRIGGER IF EXISTS {TABLE}_no_update",
    f"DROP TRIGGER IF EXISTS {TABLE}_no_delete",
]


def install(schema_editor: Any) -> None:
    """Create (or re-create) the triggers on the editor's database; other vendors: none."""
    vendor = schema_editor.connection.vendor
    if vendor == "postgresql":
        schema_editor.execute(POSTGRESQL_INSTALL, params=None)  # "%" is plpgsql's
    elif vendor == "sqlite":
        for statement in SQLITE_INSTALL:
            schema_editor.execute(statement)


def uninstall(schema_editor: Any) -> None:
    """Drop the triggers (the migration's reverse)."""
    vendor = schema_editor.connection.vendor
    if vendor == "postgresql":
        schema_editor.execute(POSTGRESQL_UNINSTALL, params=None)
    elif vendor == "sqlite":
        for statement in SQLITE_UNINSTALL:
            schema_editor.execute(statement)


def sqlite_function_register(sender: Any, connection: BaseDatabaseWrapper, **kwargs: Any) -> None:
    """connection_created: give each SQLite connection the function its DELETE trigger
    asks; it says yes only inside `audit_purge_allowed()` on that same connection."""
    if connection.vendor != "sqlite":
        return

    def purge_allowed() -> int:
        return 1 if getattr(connection, _PURGE_ATTRIBUTE, False) else 0

    connection.connection.create_function(_PURGE_FUNCTION, 0, purge_allowed)


def sqlite_triggers_ensure(using: str = "default", **kwargs: Any) -> None:
    """post_migrate: re-create the SQLite triggers a table rebuild may have dropped."""
    connection = connections[using]
    if connection.vendor != "sqlite":
        return
    applied = MigrationRecorder(connection).applied_migrations()
    if ("tenants", "0006_audit_append_only") not in applied:
        return  # migrated back to before the triggers existed
    with connection.cursor() as cursor:
        for statement in SQLITE_INSTALL:
            cursor.execute(statement)


@contextmanager
def audit_purge_allowed(using: str = "default") -> Iterator[None]:
    """Let this connection empty the audit table for the block (manage.py flush only)."""
    connection = connections[using]
    if connection.vendor == "postgresql":
        with transaction.atomic(using=using):
            with connection.cursor() as cursor:
                cursor.execute("SET LOCAL tollgate.audit_purge = 'on'")
            yield
        return
    setattr(connection, _PURGE_ATTRIBUTE, True)
    try:
        yield
    finally:
        setattr(connection, _PURGE_ATTRIBUTE, False)
