"""Prices and the usage ledger. Money is integer nano-USD; rates are Decimal."""

import uuid
from urllib.parse import urlsplit

from django.core.exceptions import ValidationError
from django.core.validators import validate_email
from django.db import models
from django.db.models import F, Q, Value
from django.db.models.functions import Coalesce

from tenants.crypto import decrypt_secret, encrypt_secret


class ModelPrice(models.Model):
    """A rate card for one model at one provider, from a date on.

    A row without an organization is the list price; a row with one is that
    organization's negotiated override and wins over the list price.
    """

    class Source(models.TextChoices):
        CATALOG = "catalog", "Pricing catalog"
        OVERRIDE = "override", "Negotiated override"
        MANUAL = "manual", "Entered by an admin"

    org = models.ForeignKey(
        "tenants.Organization",
        on_delete=models.CASCADE,
        null=True,
        blank=True,
        related_name="price_overrides",
    )
    provider_kind = models.CharField(max_length=32)
    model = models.CharField(max_length=200)
    # USD per million tokens, exact.
    input_usd_per_mtok = models.DecimalField(max_digits=14, decimal_places=6)
    output_usd_per_mtok = models.DecimalField(max_digits=14, decimal_places=6)
    # Blank means "same as input" (cached) or "same as output" (reasoning).
    cached_input_usd_per_mtok = models.DecimalField(
        max_digits=14, decimal_places=6, null=True, blank=True
    )
    reasoning_usd_per_mtok = models.DecimalField(
        max_digits=14, decimal_places=6, null=True, blank=True
    )
    effective_from = models.DateTimeField()
    effective_until = models.DateTimeField(null=True, blank=True)
    source = models.CharField(max_length=16, choices=Source.choices, default=Source.MANUAL)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["provider_kind", "model", "-effective_from"]
        constraints = [
            models.CheckConstraint(
                condition=Q(input_usd_per_mtok__gte=0)
                & Q(output_usd_per_mtok__gte=0)
                & (Q(cached_input_usd_per_mtok__isnull=True) | Q(cached_input_usd_per_mtok__gte=0))
                & (Q(reasoning_usd_per_mtok__isnull=True) | Q(reasoning_usd_per_mtok__gte=0)),
                name="price_rates_not_negative",
            ),
            models.CheckConstraint(
                condition=Q(effective_until__isnull=True)
                | Q(effective_until__gt=models.F("effective_from")),
                name="price_period_forward",
            ),
        ]
        indexes = [models.Index(fields=["provider_kind", "model"], name="price_lookup")]

    def __str__(self) -> str:
        owner = self.org.slug if self.org_id else "list"
        return f"{self.provider_kind}/{self.model} ({owner}, from {self.effective_from:%Y-%m-%d})"


class UsageEvent(models.Model):
    """One proxied request: the ledger row every report is built from."""

    class Outcome(models.TextChoices):
        SUCCESS = "success", "Success"
        CLIENT_ERROR = "client_error", "Rejected request"
        UPSTREAM_ERROR = "upstream_error", "Upstream failure"
        BLOCKED = "blocked", "Blocked by a limit or budget"

    # The request id: ingestion is idempotent on it.
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    org = models.ForeignKey(
        "tenants.Organization", on_delete=models.PROTECT, related_name="usage_events"
    )
    team = models.ForeignKey(
        "tenants.Team", on_delete=models.PROTECT, null=True, blank=True, related_name="+"
    )
    key = models.ForeignKey(
        "tenants.VirtualKey", on_delete=models.PROTECT, null=True, blank=True, related_name="+"
    )
    # Routing's rows are referenced by id and name: billing does not depend on routing.
    route_id = models.BigIntegerField(null=True, blank=True)
    deployment_id = models.BigIntegerField(null=True, blank=True)
    deployment_name = models.CharField(max_length=200, blank=True)
    provider_kind = models.CharField(max_length=32, blank=True)
    endpoint = models.CharField(max_length=32)
    model = models.CharField(max_length=200, help_text="Public model name the client asked for.")
    upstream_model = models.CharField(max_length=200, blank=True)
    input_tokens = models.PositiveBigIntegerField(default=0)
    cached_input_tokens = models.PositiveBigIntegerField(default=0)
    output_tokens = models.PositiveBigIntegerField(default=0)
    reasoning_tokens = models.PositiveBigIntegerField(default=0)
    # True when the provider sent no usage and Tollgate counted tokens itself.
    usage_estimated = models.BooleanField(default=False)
    cost_nanos = models.BigIntegerField(default=0)
    price = models.ForeignKey(
        ModelPrice, on_delete=models.PROTECT, null=True, blank=True, related_name="+"
    )
    # False when tokens were used but no price is known: flagged, never silently free.
    priced = models.BooleanField(default=True)
    outcome = models.CharField(max_length=16, choices=Outcome.choices)
    status_code = models.PositiveSmallIntegerField()
    error_class = models.CharField(max_length=64, blank=True)
    cache_hit = models.BooleanField(default=False)
    # Upstream calls made for this request (retries and fallbacks included).
    attempts = models.PositiveSmallIntegerField(default=1)
    is_stream = models.BooleanField(default=False)
    latency_ms = models.PositiveIntegerField(null=True, blank=True)
    ttft_ms = models.PositiveIntegerField(null=True, blank=True)
    # Attribution from the request: tags (x-tollgate-tags, validated, in order)
    # and the client's own end-user id (`user`, metadata.user_id or x-tollgate-user).
    tags = models.JSONField(default=list, blank=True)
    end_user = models.CharField(max_length=256, blank=True)
    # Each upstream call in order (billing.contracts.UpstreamAttempt as a dict).
    attempt_log = models.JSONField(default=list, blank=True)
    # The monthly statement that billed this event, set once when its month closed
    # (or, for a late event, when the next month closed). Null: not billed yet.
    statement = models.ForeignKey(
        "Statement", on_delete=models.PROTECT, null=True, blank=True, related_name="events"
    )
    started_at = models.DateTimeField()
    finished_at = models.DateTimeField()
    ingested_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-started_at"]
        indexes = [
            models.Index(fields=["org", "started_at"], name="usage_org_started"),
            models.Index(fields=["key", "started_at"], name="usage_key_started"),
            models.Index(fields=["team", "started_at"], name="usage_team_started"),
            # Rollup buckets and retention scan by time across orgs; the rollup
            # task finds newly ingested events by ingested_at.
            models.Index(fields=["started_at"], name="usage_started"),
            models.Index(fields=["ingested_at"], name="usage_ingested"),
            # End-user reports read events (see billing/selectors.py); most
            # requests carry no end user, so the index skips them. Tags get no
            # GIN index: reports read them from UsageTagRollup, and a GIN index
            # would tax every ingested batch.
            models.Index(
                fields=["org", "end_user", "started_at"],
                condition=~Q(end_user=""),
                name="usage_org_end_user",
            ),
        ]
        constraints = [
            models.CheckConstraint(condition=Q(cost_nanos__gte=0), name="usage_cost_not_negative")
        ]

    def __str__(self) -> str:
        return f"{self.endpoint} {self.model} {self.status_code} ({self.id})"


class UsageEventBody(models.Model):
    """The request and response bodies of one event, for orgs that log them.

    Apart from the ledger so it stays lean; deleted with its event, or earlier
    (TOLLGATE_BODY_LOG_RETENTION_DAYS). Never holds headers or keys.
    """

    event = models.OneToOneField(
        UsageEvent, on_delete=models.CASCADE, primary_key=True, related_name="body"
    )
    org = models.ForeignKey("tenants.Organization", on_delete=models.CASCADE, related_name="+")
    # The event's, copied so retention deletes by time without reading the ledger.
    started_at = models.DateTimeField()
    request_body = models.TextField(blank=True)
    request_truncated = models.BooleanField(default=False)
    response_body = models.TextField(blank=True)
    response_truncated = models.BooleanField(default=False)

    class Meta:
        indexes = [models.Index(fields=["started_at"], name="usage_body_started")]

    def __str__(self) -> str:
        return f"bodies of {self.event_id}"


class RollupMeasures(models.Model):
    """What a rollup row counts for its bucket; summing rows is exact.

    Latency and time to first token are kept as counts per fixed log-spaced
    bucket (`billing.rollups.HISTOGRAM_EDGES_MS`), so rows can be merged and
    percentiles read from the sum.
    """

    class Granularity(models.TextChoices):
        HOUR = "hour", "Hour"
        DAY = "day", "Day (UTC)"

    granularity = models.CharField(max_length=4, choices=Granularity.choices)
    bucket_start = models.DateTimeField(help_text="UTC start of the hour or day.")
    org = models.ForeignKey("tenants.Organization", on_delete=models.PROTECT, related_name="+")
    requests = models.PositiveBigIntegerField(default=0)
    successes = models.PositiveBigIntegerField(default=0)
    client_errors = models.PositiveBigIntegerField(default=0)
    upstream_errors = models.PositiveBigIntegerField(default=0)
    blocked = models.PositiveBigIntegerField(default=0)
    # Failed requests by error class ("unknown" when none was recorded).
    errors_by_class = models.JSONField(default=dict, blank=True)
    input_tokens = models.PositiveBigIntegerField(default=0)
    cached_input_tokens = models.PositiveBigIntegerField(default=0)
    output_tokens = models.PositiveBigIntegerField(default=0)
    reasoning_tokens = models.PositiveBigIntegerField(default=0)
    cost_nanos = models.BigIntegerField(default=0)
    unpriced_requests = models.PositiveBigIntegerField(default=0)
    cache_hits = models.PositiveBigIntegerField(default=0)
    latency_count = models.PositiveBigIntegerField(default=0)
    latency_sum_ms = models.PositiveBigIntegerField(default=0)
    latency_histogram = models.JSONField(default=list, blank=True)
    ttft_count = models.PositiveBigIntegerField(default=0)
    ttft_sum_ms = models.PositiveBigIntegerField(default=0)
    ttft_histogram = models.JSONField(default=list, blank=True)
    computed_at = models.DateTimeField()

    class Meta:
        abstract = True

    @property
    def errors(self) -> int:
        return self.requests - self.successes


class UsageRollup(RollupMeasures):
    """Usage per bucket, org, team, key, model, provider, deployment and endpoint.

    Rebuilt from raw events, never edited: summing rows gives the ledger's totals.
    """

    model = models.CharField(max_length=200, blank=True)
    provider_kind = models.CharField(max_length=32, blank=True)
    # Ids, not foreign keys: rollups outlive the raw events and any key or team.
    team_id = models.BigIntegerField(null=True, blank=True)
    key_id = models.BigIntegerField(null=True, blank=True)
    deployment_id = models.BigIntegerField(null=True, blank=True)
    deployment_name = models.CharField(max_length=200, blank=True)
    endpoint = models.CharField(max_length=32)

    class Meta:
        ordering = ["-bucket_start"]
        indexes = [
            models.Index(fields=["org", "granularity", "bucket_start"], name="rollup_org_bucket"),
            models.Index(fields=["granularity", "bucket_start"], name="rollup_bucket"),
        ]
        constraints = [
            # A safety net: rebuilding a bucket twice must never double it.
            models.UniqueConstraint(
                F("granularity"), F("bucket_start"), F("org"),
                Coalesce("team_id", Value(0)), Coalesce("key_id", Value(0)),
                Coalesce("deployment_id", Value(0)), F("deployment_name"),
                F("model"), F("provider_kind"), F("endpoint"),
                name="rollup_unique_group",
            ),
            models.CheckConstraint(condition=Q(cost_nanos__gte=0), name="rollup_cost_not_negative"),
        ]  # fmt: skip

    def __str__(self) -> str:
        return f"{self.granularity} {self.bucket_start:%Y-%m-%d %H:%M} {self.model}"


class UsageTagRollup(RollupMeasures):
    """Usage per bucket, org, tag, model and provider.

    A request with two tags counts once under each, so these rows must never be
    added to totals: use UsageRollup for those.
    """

    model = models.CharField(max_length=200, blank=True)
    provider_kind = models.CharField(max_length=32, blank=True)
    tag = models.CharField(max_length=64)

    class Meta:
        ordering = ["-bucket_start"]
        indexes = [
            models.Index(
                fields=["org", "granularity", "bucket_start"], name="tag_rollup_org_bucket"
            ),
            models.Index(fields=["granularity", "bucket_start"], name="tag_rollup_bucket"),
        ]
        constraints = [
            models.UniqueConstraint(
                fields=["granularity", "bucket_start", "org", "tag", "model", "provider_kind"],
                name="tag_rollup_unique_group",
            ),
            models.CheckConstraint(
                condition=Q(cost_nanos__gte=0), name="tag_rollup_cost_not_negative"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.granularity} {self.bucket_start:%Y-%m-%d %H:%M} #{self.tag}"


class UsageTeamRollup(RollupMeasures):
    """Usage per bucket, org and team: the sum of that team's UsageRollup rows.

    A few rows per hour whatever the number of keys and models, so the overview
    and the per-team figures of a month read hundreds of rows, not one per request.
    """

    team_id = models.BigIntegerField(null=True, blank=True)  # None: keys without a team

    class Meta:
        ordering = ["-bucket_start"]
        indexes = [
            models.Index(
                fields=["org", "granularity", "bucket_start"], name="team_rollup_org_bucket"
            ),
            models.Index(fields=["granularity", "bucket_start"], name="team_rollup_bucket"),
        ]
        constraints = [
            models.UniqueConstraint(
                F("granularity"),
                F("bucket_start"),
                F("org"),
                Coalesce("team_id", Value(0)),
                name="team_rollup_unique_group",
            ),
            models.CheckConstraint(
                condition=Q(cost_nanos__gte=0), name="team_rollup_cost_not_negative"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.granularity} {self.bucket_start:%Y-%m-%d %H:%M} team {self.team_id}"


class RollupState(models.Model):
    """The rollup task's progress: one row, locked while buckets are rebuilt."""

    # Every event ingested before this (less a margin for slow commits) is in the rollups.
    ingested_through = models.DateTimeField(null=True, blank=True)
    # Raw events before this were pruned: their buckets are never rebuilt again.
    pruned_before = models.DateTimeField(null=True, blank=True)
    updated_at = models.DateTimeField(auto_now=True)

    def __str__(self) -> str:
        return f"rolled up through {self.ingested_through}, pruned before {self.pruned_before}"


class ReconciliationRun(models.Model):
    """One check of rollups against raw events; a mismatch is an alert."""

    class Status(models.TextChoices):
        CLEAN = "clean", "Clean"
        REPAIRED = "repaired", "Mismatch found and repaired"
        FAILED = "failed", "Mismatch not repaired"

    class Trigger(models.TextChoices):
        SCHEDULE = "schedule", "Daily schedule"
        RETENTION = "retention", "Before pruning raw events"
        MANUAL = "manual", "Manual"

    period_start = models.DateTimeField()
    period_end = models.DateTimeField()
    trigger = models.CharField(max_length=16, choices=Trigger.choices)
    status = models.CharField(max_length=16, choices=Status.choices)
    days_checked = models.PositiveIntegerField(default=0)
    # One entry per org, day and figure that differed: the two values side by side.
    mismatches = models.JSONField(default=list, blank=True)
    started_at = models.DateTimeField()
    finished_at = models.DateTimeField()

    class Meta:
        ordering = ["-started_at"]
        indexes = [models.Index(fields=["status", "started_at"], name="reconciliation_status")]

    def __str__(self) -> str:
        return f"{self.period_start:%Y-%m-%d}..{self.period_end:%Y-%m-%d}: {self.status}"


class Statement(models.Model):
    """An organization's closed month: frozen lines, never edited (see billing/statements.py).

    Late events of a closed month appear on a later statement as adjustment lines.
    """

    org = models.ForeignKey(
        "tenants.Organization", on_delete=models.PROTECT, related_name="statements"
    )
    month = models.DateField(help_text="First day of the month, in the org's time zone.")
    time_zone = models.CharField(max_length=64)
    period_start = models.DateTimeField()
    period_end = models.DateTimeField()
    # Every event linked to the statement was in the ledger by then.
    closed_at = models.DateTimeField()
    total_nanos = models.BigIntegerField(default=0)

    class Meta:
        ordering = ["-month"]
        constraints = [
            models.UniqueConstraint(fields=["org", "month"], name="statement_one_per_org_month")
        ]

    def __str__(self) -> str:
        return f"{self.org} {self.month:%Y-%m}"


class StatementLine(models.Model):
    """One line of a statement: a team's usage of one model at one provider, for a month."""

    class Kind(models.TextChoices):
        USAGE = "usage", "Usage"
        ADJUSTMENT = "adjustment", "Adjustment (late usage of an earlier month)"

    statement = models.ForeignKey(Statement, on_delete=models.CASCADE, related_name="lines")
    position = models.PositiveIntegerField()
    kind = models.CharField(max_length=16, choices=Kind.choices)
    usage_month = models.DateField()
    # The team's id and name as they were at closing: a statement never changes.
    team_id = models.BigIntegerField(null=True, blank=True)
    team_name = models.CharField(max_length=200, blank=True)
    provider_kind = models.CharField(max_length=32, blank=True)
    model = models.CharField(max_length=200, blank=True)
    requests = models.PositiveBigIntegerField(default=0)
    input_tokens = models.PositiveBigIntegerField(default=0)
    cached_input_tokens = models.PositiveBigIntegerField(default=0)
    output_tokens = models.PositiveBigIntegerField(default=0)
    reasoning_tokens = models.PositiveBigIntegerField(default=0)
    unpriced_requests = models.PositiveBigIntegerField(default=0)
    amount_nanos = models.BigIntegerField(default=0)

    class Meta:
        ordering = ["statement", "position"]
        constraints = [
            models.UniqueConstraint(
                fields=["statement", "position"], name="statement_line_position_unique"
            )
        ]

    def __str__(self) -> str:
        return f"{self.statement} #{self.position} {self.model}"


def validate_webhook_url(value: str) -> None:
    """An http(s) URL without credentials: receivers authenticate us by the signature."""
    parts = urlsplit(value)
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        raise ValidationError("Give an http:// or https:// URL.")
    if parts.username is not None or parts.password is not None:
        raise ValidationError("The URL must not carry credentials: the signature proves us.")
    if parts.fragment:
        raise ValidationError("The URL must not have a fragment (#…).")


def recipients_parse(value: str) -> list[str]:
    """The addresses in a comma- (or newline-) separated list, blanks dropped."""
    return [item.strip() for item in value.replace("\n", ",").split(",") if item.strip()]


class AlertChannel(models.Model):
    """Where an organization's alerts go: a signed webhook or e-mail recipients."""

    class Kind(models.TextChoices):
        WEBHOOK = "webhook", "Webhook (signed JSON POST)"
        EMAIL = "email", "E-mail"

    org = models.ForeignKey(
        "tenants.Organization", on_delete=models.CASCADE, related_name="alert_channels"
    )
    name = models.CharField(max_length=200)
    kind = models.CharField(max_length=8, choices=Kind.choices)
    url = models.CharField(
        max_length=2000, blank=True, validators=[validate_webhook_url], help_text="Webhooks."
    )
    recipients = models.TextField(blank=True, help_text="E-mail: comma-separated addresses.")
    # Fernet ciphertext of the webhook signing secret; read it through secret().
    secret_encrypted = models.TextField(blank=True, editable=False)
    notify_threshold = models.BooleanField("threshold reached", default=True)
    notify_exhausted = models.BooleanField("budget exhausted", default=True)
    notify_spike = models.BooleanField("spend spike", default=True)
    enabled = models.BooleanField(default=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["org", "name"]

    def __str__(self) -> str:
        return f"{self.name} ({self.get_kind_display()})"

    def clean(self) -> None:
        if self.kind == self.Kind.WEBHOOK and not self.url:
            raise ValidationError({"url": "A webhook needs a URL."})
        if self.kind == self.Kind.EMAIL:
            addresses = recipients_parse(self.recipients)
            if not addresses:
                raise ValidationError({"recipients": "Give at least one e-mail address."})
            for address in addresses:
                try:
                    validate_email(address)
                except ValidationError:
                    raise ValidationError(
                        {"recipients": f"{address!r} is not an e-mail address."}
                    ) from None

    def wants(self, kind: str) -> bool:
        return bool(getattr(self, f"notify_{kind}", False))

    def set_secret(self, plaintext: str) -> None:
        self.secret_encrypted = encrypt_secret(plaintext) if plaintext else ""

    def secret(self) -> str:
        return decrypt_secret(self.secret_encrypted) if self.secret_encrypted else ""

    @property
    def has_secret(self) -> bool:
        return bool(self.secret_encrypted)


class Alert(models.Model):
    """One alert, recorded once: what happened, and the payload every channel was sent.

    The conditional unique constraints make "once per threshold per period" (and
    "one spike alert per org per hour") exact even when two workers evaluate at once.
    """

    class Kind(models.TextChoices):
        THRESHOLD = "threshold", "Budget threshold reached"
        EXHAUSTED = "exhausted", "Budget exhausted"
        SPIKE = "spike", "Spend spike"
        TEST = "test", "Test alert (sent from the settings page)"

    org = models.ForeignKey("tenants.Organization", on_delete=models.CASCADE, related_name="alerts")
    # Null for spikes; kept (as null) if the budget is deleted: the message says which it was.
    budget = models.ForeignKey(
        "tenants.Budget", on_delete=models.SET_NULL, null=True, blank=True, related_name="alerts"
    )
    kind = models.CharField(max_length=16, choices=Kind.choices)
    # The budget's period (`m2026-11`), or the UTC clock hour of a spike (`h2026-11-21T14`).
    period_id = models.CharField(max_length=32)
    # Percent of the limit for threshold alerts; 0 otherwise.
    threshold = models.PositiveSmallIntegerField(default=0)
    spend_nanos = models.BigIntegerField(default=0)
    limit_nanos = models.BigIntegerField(default=0)
    baseline_nanos = models.BigIntegerField(default=0)
    message = models.TextField()
    payload = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at"]
        indexes = [models.Index(fields=["org", "created_at"], name="alert_org_created")]
        constraints = [
            models.UniqueConstraint(
                fields=["budget", "kind", "period_id", "threshold"],
                condition=Q(budget__isnull=False),
                name="alert_once_per_budget_period",
            ),
            models.UniqueConstraint(
                fields=["org", "kind", "period_id"],
                condition=Q(kind="spike"),
                name="alert_spike_once_per_org_hour",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.get_kind_display()} {self.period_id} ({self.org_id})"


class AlertDelivery(models.Model):
    """One alert to one channel: attempted until delivered or out of attempts."""

    class Status(models.TextChoices):
        PENDING = "pending", "Pending"
        DELIVERED = "delivered", "Delivered"
        FAILED = "failed", "Failed (gave up)"

    alert = models.ForeignKey(Alert, on_delete=models.CASCADE, related_name="deliveries")
    channel = models.ForeignKey(AlertChannel, on_delete=models.CASCADE, related_name="deliveries")
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.PENDING)
    attempts = models.PositiveSmallIntegerField(default=0)
    # When the next attempt is due (pending only); while one runs, the end of its lease.
    next_attempt_at = models.DateTimeField(null=True, blank=True)
    # What went wrong last, in a few words: never a URL, secret or response body.
    last_error = models.CharField(max_length=300, blank=True)
    response_status = models.PositiveSmallIntegerField(null=True, blank=True)
    delivered_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at"]
        indexes = [models.Index(fields=["status", "next_attempt_at"], name="alert_delivery_due")]
        constraints = [
            models.UniqueConstraint(fields=["alert", "channel"], name="alert_delivery_once")
        ]

    def __str__(self) -> str:
        return f"alert {self.alert_id} to channel {self.channel_id}: {self.status}"
