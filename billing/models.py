"""Prices and the usage ledger. Money is integer nano-USD; rates are Decimal."""

import uuid

from django.db import models
from django.db.models import Q


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
    started_at = models.DateTimeField()
    finished_at = models.DateTimeField()
    ingested_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-started_at"]
        indexes = [
            models.Index(fields=["org", "started_at"], name="usage_org_started"),
            models.Index(fields=["key", "started_at"], name="usage_key_started"),
            models.Index(fields=["team", "started_at"], name="usage_team_started"),
        ]
        constraints = [
            models.CheckConstraint(condition=Q(cost_nanos__gte=0), name="usage_cost_not_negative")
        ]

    def __str__(self) -> str:
        return f"{self.endpoint} {self.model} {self.status_code} ({self.id})"
