from django.apps import AppConfig


class TenantsConfig(AppConfig):
    name = "tenants"
    verbose_name = "Tenants"

    def ready(self) -> None:
        from django.db.backends.signals import connection_created
        from django.db.models.signals import post_migrate

        from tenants import audit_guard, signals

        signals.connect()
        # The audit log's append-only triggers (tenants/audit_guard.py).
        connection_created.connect(
            audit_guard.sqlite_function_register, dispatch_uid="tenants-audit-sqlite-function"
        )
        post_migrate.connect(
            audit_guard.sqlite_triggers_ensure, sender=self, dispatch_uid="tenants-audit-triggers"
        )
