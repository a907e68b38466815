"""Organizations, teams, members, virtual keys, budgets and the audit log."""

import uuid
import zoneinfo
from typing import Any, Self

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.validators import MinValueValidator
from django.db import models
from django.db.models import Q
from django.utils import timezone


def validate_time_zone(value: str) -> None:
    """Accept IANA zone names only (e.g. Europe/Berlin)."""
    if value not in zoneinfo.available_timezones():
        raise ValidationError(f"{value!r} is not a known IANA time zone.")


class RateLimited(models.Model):
    """Per-minute rate limits (blank: none), enforced exactly across replicas."""

    rpm_limit = models.PositiveIntegerField(
        null=True,
        blank=True,
        validators=[MinValueValidator(1)],
        help_text="Requests per minute (blank: no limit).",
    )
    tpm_limit = models.PositiveIntegerField(
        null=True,
        blank=True,
        validators=[MinValueValidator(1)],
        help_text="Tokens per minute (blank: no limit).",
    )

    class Meta:
        abstract = True


class Organization(RateLimited):
    slug = models.SlugField(max_length=64, unique=True)
    name = models.CharField(max_length=200)
    time_zone = models.CharField(max_length=64, default="UTC", validators=[validate_time_zone])
    # Keep prompt and response bodies for the request log; off, only metadata is kept.
    log_request_bodies = models.BooleanField(default=False)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class Team(RateLimited):
    org = models.ForeignKey(Organization, on_delete=models.CASCADE, related_name="teams")
    slug = models.SlugField(max_length=64)
    name = models.CharField(max_length=200)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["org", "name"]
        constraints = [
            models.UniqueConstraint(fields=["org", "slug"], name="team_unique_slug_per_org")
        ]

    def __str__(self) -> str:
        return f"{self.org.slug}/{self.slug}"


class Membership(models.Model):
    class Role(models.TextChoices):
        OWNER = "owner", "Owner"
        ADMIN = "admin", "Admin"
        FINANCE = "finance", "Finance"
        MEMBER = "member", "Member"

    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="memberships"
    )
    org = models.ForeignKey(Organization, on_delete=models.CASCADE, related_name="memberships")
    role = models.CharField(max_length=16, choices=Role.choices, default=Role.MEMBER)
    # A member's own team: members see that team's keys and usage.
    team = models.ForeignKey(
        Team, on_delete=models.SET_NULL, null=True, blank=True, related_name="memberships"
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["user", "org"], name="membership_unique_user_org")
        ]

    def __str__(self) -> str:
        return f"{self.user} in {self.org.slug} ({self.role})"

    def clean(self) -> None:
        if self.team_id and self.org_id and self.team.org_id != self.org_id:
            raise ValidationError({"team": "The team belongs to another organization."})


class RevocableQuerySet(models.QuerySet[Any]):
    """Rows with `revoked_at` and `expires_at` (virtual keys, API tokens)."""

    def active(self) -> Self:
        """Those neither revoked nor past their expiry."""
        now = timezone.now()
        return self.filter(revoked_at__isnull=True).filter(
            Q(expires_at__isnull=True) | Q(expires_at__gt=now)
        )


class Revocable:
    """`is_active` for a model with `revoked_at` and `expires_at` fields."""

    revoked_at: Any
    expires_at: Any

    @property
    def is_active(self) -> bool:
        now = timezone.now()
        return self.revoked_at is None and (self.expires_at is None or self.expires_at > now)


class VirtualKeyQuerySet(RevocableQuerySet):
    def for_org(self, org: Organization) -> Self:
        return self.filter(org=org)


class VirtualKey(Revocable, RateLimited):
    org = models.ForeignKey(Organization, on_delete=models.PROTECT, related_name="keys")
    team = models.ForeignKey(
        Team, on_delete=models.PROTECT, null=True, blank=True, related_name="keys"
    )
    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="virtual_keys",
    )
    name = models.CharField(max_length=200)
    # The visible start of the key ("tgk_ab12CD34"), unique: shown in lists and logs.
    prefix = models.CharField(max_length=32, unique=True, editable=False)
    # SHA-256 of the whole key; the key itself is never stored.
    secret_hash = models.CharField(max_length=64, editable=False)
    # Public model names this key may call; empty means every model of its org.
    allowed_models = models.JSONField(default=list, blank=True)
    # Client networks (CIDRs, normalised by the services) it may be used from; empty: any.
    allowed_ips = models.JSONField(default=list, blank=True)
    expires_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)
    metadata = models.JSONField(default=dict, blank=True)
    last_used_at = models.DateTimeField(null=True, blank=True, editable=False)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    objects = VirtualKeyQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at"]
        indexes = [models.Index(fields=["org", "revoked_at"], name="key_org_revoked")]

    def __str__(self) -> str:
        return f"{self.name} ({self.prefix}…)"

    def clean(self) -> None:
        if self.team_id and self.org_id and self.team.org_id != self.org_id:
            raise ValidationError({"team": "The team belongs to another organization."})
        if not isinstance(self.allowed_models, list) or not all(
            isinstance(name, str) and name for name in self.allowed_models
        ):
            raise ValidationError({"allowed_models": "Give a list of model names."})
        if not isinstance(self.metadata, dict):
            raise ValidationError({"metadata": "Give a JSON object."})


class Budget(models.Model):
    class Scope(models.TextChoices):
        ORG = "org", "Organization"
        TEAM = "team", "Team"
        KEY = "key", "Key"

    class Period(models.TextChoices):
        DAILY = "daily", "Daily"
        WEEKLY = "weekly", "Weekly"
        MONTHLY = "monthly", "Monthly"
        LIFETIME = "lifetime", "Lifetime"

    class Enforcement(models.TextChoices):
        HARD = "hard", "Hard limit (blocks)"
        SOFT = "soft", "Soft limit (alerts only)"

    org = models.ForeignKey(Organization, on_delete=models.CASCADE, related_name="budgets")
    scope = models.CharField(max_length=8, choices=Scope.choices)
    team = models.ForeignKey(
        Team, on_delete=models.CASCADE, null=True, blank=True, related_name="budgets"
    )
    key = models.ForeignKey(
        VirtualKey, on_delete=models.CASCADE, null=True, blank=True, related_name="budgets"
    )
    period = models.CharField(max_length=8, choices=Period.choices, default=Period.MONTHLY)
    # Integer nano-USD (10^-9 $): exact, and cheap to add up in Redis and SQL.
    limit_nanos = models.BigIntegerField()
    # Percentages of the limit that alert once per period.
    soft_thresholds = models.JSONField(default=list, blank=True)
    enforcement = models.CharField(
        max_length=8, choices=Enforcement.choices, default=Enforcement.HARD
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        constraints = [
            models.CheckConstraint(
                condition=(
                    Q(scope="org", team__isnull=True, key__isnull=True)
                    | Q(scope="team", team__isnull=False, key__isnull=True)
                    | Q(scope="key", team__isnull=True, key__isnull=False)
                ),
                name="budget_target_matches_scope",
            ),
            models.CheckConstraint(condition=Q(limit_nanos__gt=0), name="budget_limit_positive"),
        ]

    def __str__(self) -> str:
        return f"{self.get_scope_display()} budget {self.period} ({self.org.slug})"

    def clean(self) -> None:
        for related in (self.team, self.key):
            if related is not None and self.org_id and related.org_id != self.org_id:
                raise ValidationError("The budget's team or key belongs to another organization.")
        thresholds = self.soft_thresholds
        if not isinstance(thresholds, list) or not all(
            isinstance(value, int) and 0 < value <= 100 for value in thresholds
        ):
            raise ValidationError({"soft_thresholds": "Give whole percentages from 1 to 100."})


class APIToken(Revocable, models.Model):
    """A token for the management API, scoped to one organization with one role.

    Looks like a virtual key with a "tgm_" start; only its SHA-256 is stored.
    """

    class Role(models.TextChoices):
        ADMIN = "admin", "Admin: read and change everything"
        FINANCE = "finance", "Finance: read everything, change budgets"
        READ_ONLY = "read_only", "Read-only"

    org = models.ForeignKey(Organization, on_delete=models.CASCADE, related_name="api_tokens")
    name = models.CharField(max_length=100)
    role = models.CharField(max_length=16, choices=Role.choices)
    prefix = models.CharField(max_length=32, unique=True, editable=False)
    secret_hash = models.CharField(max_length=64, editable=False)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    expires_at = models.DateTimeField(null=True, blank=True)
    last_used_at = models.DateTimeField(null=True, blank=True, editable=False)
    revoked_at = models.DateTimeField(null=True, blank=True)

    objects = RevocableQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.name} ({self.prefix}…)"


class AuditLogImmutable(Exception):
    """An audit entry cannot be changed or deleted: the log is append-only."""


class AuditLogQuerySet(models.QuerySet["AuditLog"]):
    # The database refuses these too (tenants/audit_guard.py); failing here says why sooner.
    def update(self, **kwargs: Any) -> int:
        if kwargs == {"actor": None}:
            return super().update(**kwargs)  # the acting user was deleted (SET_NULL)
        raise AuditLogImmutable("Audit entries are append-only: they cannot be changed.")

    def delete(self) -> tuple[int, dict[str, int]]:
        raise AuditLogImmutable("Audit entries are append-only: they cannot be deleted.")

    def bulk_update(self, *args: Any, **kwargs: Any) -> int:
        raise AuditLogImmutable("Audit entries are append-only: they cannot be changed.")


class AuditLog(models.Model):
    """Append-only record of every administrative change."""

    org = models.ForeignKey(
        Organization, on_delete=models.PROTECT, null=True, blank=True, related_name="audit_entries"
    )
    actor = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="audit_entries",
    )
    # Who acted when there is no user: "cli", "seed", "system".
    actor_label = models.CharField(max_length=100, blank=True)
    action = models.CharField(max_length=64)
    target_type = models.CharField(max_length=64)
    target_id = models.CharField(max_length=64)
    before = models.JSONField(null=True, blank=True)
    after = models.JSONField(null=True, blank=True)
    ip_address = models.GenericIPAddressField(null=True, blank=True)
    created_at = models.DateTimeField(default=timezone.now, db_index=True)

    objects = AuditLogQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at"]
        indexes = [models.Index(fields=["org", "created_at"], name="audit_org_created")]

    def __str__(self) -> str:
        return f"{self.action} {self.target_type}:{self.target_id}"

    def save(self, *args: Any, **kwargs: Any) -> None:
        if not self._state.adding:
            raise AuditLogImmutable("Audit entries are append-only: they cannot be changed.")
        super().save(*args, **kwargs)

    def delete(self, *args: Any, **kwargs: Any) -> tuple[int, dict[str, int]]:
        raise AuditLogImmutable("Audit entries are append-only: they cannot be deleted.")


class ConfigRevision(models.Model):
    """One row whose token changes whenever proxy configuration changes.

    Every web process polls it and reloads its in-process snapshot when the
    token differs; a random token (not a counter) also notices a reset table.
    """

    id = models.PositiveSmallIntegerField(primary_key=True, default=1, editable=False)
    token = models.UUIDField(default=uuid.uuid4)
    changed_at = models.DateTimeField(default=timezone.now)

    def __str__(self) -> str:
        return str(self.token)


class InvitationQuerySet(models.QuerySet["Invitation"]):
    def pending(self) -> "InvitationQuerySet":
        """Invitations that can still be accepted: not used, not revoked, not expired."""
        return self.filter(
            accepted_at__isnull=True, revoked_at__isnull=True, expires_at__gt=timezone.now()
        )


class Invitation(models.Model):
    """A single-use link that makes whoever opens it a member of `org` in `role`."""

    class Status(models.TextChoices):
        PENDING = "pending", "Pending"
        ACCEPTED = "accepted", "Accepted"
        REVOKED = "revoked", "Revoked"
        EXPIRED = "expired", "Expired"

    org = models.ForeignKey(Organization, on_delete=models.CASCADE, related_name="invitations")
    # Where the link was sent, if anywhere; anyone holding the link may accept it.
    email = models.EmailField(blank=True)
    role = models.CharField(max_length=16, choices=Membership.Role.choices)
    team = models.ForeignKey(
        Team, on_delete=models.SET_NULL, null=True, blank=True, related_name="invitations"
    )
    # SHA-256 of the token in the link; the token itself is never stored.
    token_hash = models.CharField(max_length=64, unique=True, editable=False)
    invited_by = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="invitations_sent",
    )
    expires_at = models.DateTimeField()
    accepted_at = models.DateTimeField(null=True, blank=True)
    accepted_by = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="invitations_accepted",
    )
    revoked_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    objects = InvitationQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at"]
        indexes = [models.Index(fields=["org", "created_at"], name="invitation_org_created")]

    def __str__(self) -> str:
        return f"invitation to {self.org.slug} as {self.role}"

    def clean(self) -> None:
        if self.team_id and self.org_id and self.team.org_id != self.org_id:
            raise ValidationError({"team": "The team belongs to another organization."})

    @property
    def status(self) -> str:
        if self.accepted_at is not None:
            return self.Status.ACCEPTED
        if self.revoked_at is not None:
            return self.Status.REVOKED
        if self.expires_at <= timezone.now():
            return self.Status.EXPIRED
        return self.Status.PENDING
