"""The proxy-configuration revision every web process polls."""

import uuid

from django.db import transaction
from django.utils import timezone

from tenants.models import ConfigRevision


def config_revision_bump() -> None:
    """Mark proxy configuration as changed, once the current transaction commits."""
    transaction.on_commit(_write_new_revision)


def _write_new_revision() -> None:
    ConfigRevision.objects.update_or_create(
        id=1, defaults={"token": uuid.uuid4(), "changed_at": timezone.now()}
    )


def config_revision_get() -> str:
    """The current revision token ("" before anything was configured)."""
    token = ConfigRevision.objects.filter(id=1).values_list("token", flat=True).first()
    return str(token) if token else ""
