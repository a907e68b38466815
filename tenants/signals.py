"""Configuration changes invalidate every web process's snapshot.

Signals are used only for this cache invalidation, so edits through services,
the Django admin or a shell are all noticed. Bulk `.update()` calls bypass
signals and must call `config_revision_bump()` themselves.
"""

from django.db.models import Model
from django.db.models.signals import m2m_changed, post_delete, post_save

from tenants.config import config_revision_bump


def _changed(sender: type[Model], **kwargs: object) -> None:
    config_revision_bump()


def watch(*models: type[Model]) -> None:
    """Bump the configuration revision whenever one of `models` is saved or deleted."""
    for model in models:
        label = model._meta.label
        post_save.connect(_changed, sender=model, dispatch_uid=f"config-{label}-save")
        post_delete.connect(_changed, sender=model, dispatch_uid=f"config-{label}-delete")


def watch_relation(through: type[Model]) -> None:
    """Bump the configuration revision whenever a many-to-many relation changes."""
    m2m_changed.connect(_changed, sender=through, dispatch_uid=f"config-{through._meta.label}")


def connect() -> None:
    from tenants.models import Budget, Organization, Team, VirtualKey

    watch(Organization, Team, VirtualKey, Budget)
