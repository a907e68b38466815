"""Django's `flush`, allowed to empty the append-only audit log (tenants/audit_guard.py).

Emptying every table is the one time audit entries may go: the database triggers let
this command's own connection through, and nothing else. The test suite's teardown of
transactional tests runs this command too.
"""

from typing import Any

from django.core.management.commands import flush

from tenants.audit_guard import audit_purge_allowed


class Command(flush.Command):
    def handle(self, **options: Any) -> None:
        with audit_purge_allowed(options["database"]):
            super().handle(**options)
