"""Re-encrypt every stored secret under the primary encryption key.

python manage.py rotate_encryption_key [--check] [--batch-size N]

Rotation, with the gateway running throughout:
  1. put the new key first: TOLLGATE_ENCRYPTION_KEYS=NEW,OLD, and restart (or redeploy)
     every process: new secrets are now written under NEW, old ones still read with OLD;
  2. run this command: it rewrites every value still under another key;
  3. `rotate_encryption_key --check` exits 0 once nothing is left under OLD;
  4. drop OLD: TOLLGATE_ENCRYPTION_KEYS=NEW, restart.

Every encrypted column is found by convention: a model field named `*_encrypted` holds
Fernet tokens written by tenants.crypto (provider API keys, alert channels' signing
secrets, ...). Values already under the primary key are skipped, so the command is
idempotent and can be stopped and run again. Each value is swapped only if it is still
the one read, so a secret changed meanwhile (written under the primary key by the
running site) is never overwritten with the old one. It prints counts, never a secret.
"""

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from cryptography.fernet import Fernet, InvalidToken
from django.apps import apps
from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import models, transaction

from tenants.crypto import SecretUnreadable, reencrypt_secret
from tenants.models import AuditLog

ENCRYPTED_SUFFIX = "_encrypted"


@dataclass
class ColumnTally:
    label: str  # "routing.provider.api_key_encrypted"
    current: int = 0  # already under the primary key
    reencrypted: int = 0
    changed_meanwhile: int = 0  # rewritten by someone else while we worked
    unreadable: int = 0  # under no configured key

    @property
    def not_current(self) -> int:
        return self.reencrypted + self.changed_meanwhile + self.unreadable


def encrypted_columns() -> Iterator[tuple[type[models.Model], str]]:
    """Every (model, field name) holding secrets encrypted by tenants.crypto."""
    for model in apps.get_models():
        for field in model._meta.concrete_fields:
            if field.name.endswith(ENCRYPTED_SUFFIX) and isinstance(field, models.TextField):
                yield model, field.attname


def key_fingerprint(key: str) -> str:
    """A short, one-way name for a key, so logs and the audit entry can tell keys apart."""
    return hashlib.sha256(key.encode()).hexdigest()[:12]


class Command(BaseCommand):
    help = "Re-encrypt every stored secret under the first TOLLGATE_ENCRYPTION_KEYS key."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--check",
            action="store_true",
            help="change nothing; exit 1 if any value is not under the primary key yet",
        )
        parser.add_argument("--batch-size", type=int, default=500, help="rows per transaction")

    def handle(self, *args: Any, **options: Any) -> None:
        keys = settings.TOLLGATE_ENCRYPTION_KEYS
        if not keys:
            raise CommandError("TOLLGATE_ENCRYPTION_KEYS is not set.")
        if options["batch_size"] < 1:
            raise CommandError("--batch-size must be at least 1.")
        primary = Fernet(keys[0].encode())
        check = options["check"]
        tallies = [
            self._column(model, field, primary, check=check, batch_size=options["batch_size"])
            for model, field in encrypted_columns()
        ]
        for tally in tallies:
            self.stdout.write(
                f"{tally.label}: {tally.current} under the primary key, "
                + (
                    f"{tally.not_current - tally.unreadable} to re-encrypt, "
                    if check
                    else f"{tally.reencrypted} re-encrypted, "
                    f"{tally.changed_meanwhile} changed meanwhile, "
                )
                + f"{tally.unreadable} unreadable with the configured keys"
            )
        unreadable = sum(tally.unreadable for tally in tallies)
        if check:
            pending = sum(tally.not_current for tally in tallies)
            if pending:
                raise CommandError(
                    f"{pending} value(s) are not under the primary key "
                    f"({key_fingerprint(keys[0])}) yet: "
                    + (
                        f"{unreadable} cannot be read with any configured key; "
                        if unreadable
                        else ""
                    )
                    + "run `manage.py rotate_encryption_key` before removing an old key.",
                    returncode=1,
                )
            self.stdout.write(
                f"Every value is under the primary key ({key_fingerprint(keys[0])}): "
                "older keys can be removed."
            )
            return
        AuditLog.objects.create(
            org=None,
            actor_label="cli",
            action="encryption_key.rotate",
            target_type="tenants.encryptionkey",
            target_id=key_fingerprint(keys[0]),
            before=None,
            after={
                "primary_key": key_fingerprint(keys[0]),
                "keys_configured": len(keys),
                "columns": {
                    tally.label: {
                        "reencrypted": tally.reencrypted,
                        "already_current": tally.current,
                        "unreadable": tally.unreadable,
                    }
                    for tally in tallies
                },
            },
        )
        if unreadable:
            raise CommandError(
                f"{unreadable} value(s) cannot be decrypted with any configured key and were "
                "left as they are: add the key they were written with, or set those secrets "
                "again.",
                returncode=1,
            )
        self.stdout.write("Done: every readable value is under the primary key.")

    def _column(
        self,
        model: type[models.Model],
        field: str,
        primary: Fernet,
        *,
        check: bool,
        batch_size: int,
    ) -> ColumnTally:
        tally = ColumnTally(label=f"{model._meta.label_lower}.{field}")
        rows = model._base_manager.exclude(**{field: ""}).order_by("pk")
        last_pk: Any = None
        while True:
            page = rows if last_pk is None else rows.filter(pk__gt=last_pk)
            batch = list(page.values_list("pk", field)[:batch_size])
            if not batch:
                return tally
            last_pk = batch[-1][0]
            swaps: list[tuple[Any, str, str]] = []
            for pk, ciphertext in batch:
                try:
                    primary.decrypt(ciphertext.encode())
                    tally.current += 1
                    continue
                except InvalidToken:
                    pass
                try:
                    swaps.append((pk, ciphertext, reencrypt_secret(ciphertext)))
                except SecretUnreadable:
                    tally.unreadable += 1
            if check:
                tally.reencrypted += len(swaps)
                continue
            with transaction.atomic():
                for pk, old, new in swaps:
                    # Compare-and-swap: a secret set meanwhile is already under the
                    # primary key and must not be replaced by the old one.
                    if model._base_manager.filter(pk=pk, **{field: old}).update(**{field: new}):
                        tally.reencrypted += 1
                    else:
                        tally.changed_meanwhile += 1
