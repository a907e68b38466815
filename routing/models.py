"""Providers (with encrypted credentials), deployments and routes."""

from urllib.parse import urlsplit

from django.core.exceptions import ValidationError
from django.db import models
from django.db.models import Q

from routing.providers.presets import default_base_url
from tenants.crypto import decrypt_secret, encrypt_secret


def validate_base_url(value: str) -> None:
    """An http(s) URL without credentials, query or fragment."""
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 -- parsed lazily: raises ValueError for a bad port
    except ValueError:
        raise ValidationError("Give a well-formed http:// or https:// URL.") from None
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        raise ValidationError("Give an http:// or https:// URL.")
    if parts.username or parts.password or parts.query or parts.fragment:
        raise ValidationError("The URL must not carry credentials, a query or a fragment.")


class Provider(models.Model):
    class Kind(models.TextChoices):
        OPENAI = "openai", "OpenAI"
        AZURE = "azure", "Azure OpenAI"
        ANTHROPIC = "anthropic", "Anthropic"
        GEMINI = "gemini", "Google Gemini"
        OPENAI_COMPATIBLE = "openai_compatible", "OpenAI-compatible host"
        GROQ = "groq", "Groq"
        TOGETHER = "together", "Together AI"
        MISTRAL = "mistral", "Mistral"
        DEEPSEEK = "deepseek", "DeepSeek"
        FIREWORKS = "fireworks", "Fireworks AI"
        OPENROUTER = "openrouter", "OpenRouter"
        VLLM = "vllm", "vLLM"
        OLLAMA = "ollama", "Ollama"
        LMSTUDIO = "lmstudio", "LM Studio"
        MOCK = "mock", "Built-in mock provider"

    # Null: a platform provider every organization's routes may use.
    org = models.ForeignKey(
        "tenants.Organization",
        on_delete=models.CASCADE,
        null=True,
        blank=True,
        related_name="providers",
    )
    name = models.CharField(max_length=200)
    kind = models.CharField(max_length=32, choices=Kind.choices)
    # Blank: the kind's well-known URL (routing.providers.presets).
    base_url = models.CharField(max_length=500, blank=True, validators=[validate_base_url])
    # Azure OpenAI's api-version query parameter.
    api_version = models.CharField(max_length=32, blank=True)
    # Fernet ciphertext of the API key; read it through api_key().
    api_key_encrypted = models.TextField(blank=True, editable=False)
    enabled = models.BooleanField(default=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    def clean(self) -> None:
        if not self.base_url and not default_base_url(self.kind):
            raise ValidationError({"base_url": "This kind of provider needs a base URL."})
        if self.kind == self.Kind.AZURE and not self.api_version:
            raise ValidationError({"api_version": "Azure OpenAI needs an api-version."})

    def set_api_key(self, plaintext: str) -> None:
        self.api_key_encrypted = encrypt_secret(plaintext) if plaintext else ""

    def api_key(self) -> str:
        return decrypt_secret(self.api_key_encrypted) if self.api_key_encrypted else ""

    @property
    def has_api_key(self) -> bool:
        return bool(self.api_key_encrypted)


class Deployment(models.Model):
    """One model at one provider, with its timeouts and its share of traffic."""

    provider = models.ForeignKey(Provider, on_delete=models.CASCADE, related_name="deployments")
    name = models.CharField(max_length=200)
    upstream_model = models.CharField(max_length=200)
    weight = models.PositiveIntegerField(default=1, help_text="Share of traffic (weighted routes).")
    priority = models.PositiveIntegerField(default=0, help_text="Lower is tried first.")
    connect_timeout_ms = models.PositiveIntegerField(default=5_000)
    ttft_timeout_ms = models.PositiveIntegerField(
        default=60_000, help_text="Longest wait for the first byte of the answer."
    )
    read_timeout_ms = models.PositiveIntegerField(
        default=120_000, help_text="Longest silence between two chunks."
    )
    total_timeout_ms = models.PositiveIntegerField(default=600_000)
    # Prompt plus output tokens the model accepts; longer requests go to the
    # next deployment or fallback instead (blank: unknown, never skipped).
    context_window_tokens = models.PositiveIntegerField(null=True, blank=True)
    # The provider's own rate limits for this deployment (blank: none). The router
    # keeps each deployment under them, and usage-aware routes prefer the one
    # with the most headroom.
    rpm_limit = models.PositiveIntegerField(
        null=True, blank=True, help_text="Requests per minute this deployment may take."
    )
    tpm_limit = models.PositiveIntegerField(
        null=True, blank=True, help_text="Tokens per minute this deployment may take."
    )
    enabled = models.BooleanField(default=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["priority", "name"]
        constraints = [
            models.UniqueConstraint(
                fields=["provider", "name"], name="deployment_unique_name_per_provider"
            ),
            models.CheckConstraint(
                condition=Q(connect_timeout_ms__gt=0)
                & Q(ttft_timeout_ms__gt=0)
                & Q(read_timeout_ms__gt=0)
                & Q(total_timeout_ms__gt=0),
                name="deployment_timeouts_positive",
            ),
        ]

    def __str__(self) -> str:
        return self.name


class Route(models.Model):
    """A public model name and the deployments that serve it."""

    class Strategy(models.TextChoices):
        PRIORITY = "priority", "Priority failover (lowest first)"
        WEIGHTED = "weighted", "Weighted random"
        LEAST_LATENCY = "least_latency", "Least latency (recent, decayed)"
        LOWEST_COST = "lowest_cost", "Lowest cost for the request"
        LEAST_BUSY = "least_busy", "Fewest requests in flight"
        USAGE_AWARE = "usage_aware", "Most headroom under the deployments' RPM/TPM limits"

    class UnsupportedParams(models.TextChoices):
        REJECT = "reject", "Answer 400 naming the parameter"
        DROP = "drop", "Drop it and call the provider anyway"

    # Null: a global route every organization can call (an org's own route
    # with the same name wins).
    org = models.ForeignKey(
        "tenants.Organization",
        on_delete=models.CASCADE,
        null=True,
        blank=True,
        related_name="routes",
    )
    model_name = models.CharField(max_length=200)
    strategy = models.CharField(max_length=16, choices=Strategy.choices, default=Strategy.PRIORITY)
    deployments = models.ManyToManyField(Deployment, related_name="routes")
    # Other public model names to try, in order, when every deployment here fails
    # (e.g. a GPT route falling back to a Claude route).
    fallback_models = models.JSONField(default=list, blank=True)
    max_attempts = models.PositiveSmallIntegerField(
        default=3, help_text="Upstream calls per request, retries and fallbacks included."
    )
    deadline_ms = models.PositiveIntegerField(
        default=120_000, help_text="No new attempt (retry or fallback) starts after this."
    )
    # A request under a hard budget must have a bounded cost: when the client
    # sets no output limit, this one is sent upstream and reserved.
    max_output_tokens = models.PositiveIntegerField(
        null=True,
        blank=True,
        help_text="Output tokens allowed when a request under a hard budget sets none "
        "(blank: TOLLGATE_DEFAULT_MAX_OUTPUT_TOKENS).",
    )

    class CacheBilling(models.TextChoices):
        FREE = "free", "Cache hits cost nothing"
        FULL = "full", "Cache hits cost what the original call cost"

    class StickyBy(models.TextChoices):
        KEY = "key", "Virtual key"
        USER = "user", "End user (the request's `user` field, else the key)"

    # A/B split: this share of traffic goes to the variant first, the same
    # choice every time for one key (or end user).
    variant_deployment = models.ForeignKey(
        Deployment, on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    variant_percent = models.PositiveSmallIntegerField(default=0)
    variant_sticky_by = models.CharField(
        max_length=8, choices=StickyBy.choices, default=StickyBy.KEY
    )
    # Shadow traffic: this share of requests is also sent, in the background,
    # to a candidate deployment; the client never waits for it or sees it.
    shadow_deployment = models.ForeignKey(
        Deployment, on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    shadow_percent = models.PositiveSmallIntegerField(default=0)
    # Response cache: 0 keeps it off; clients may bypass it per request.
    cache_ttl_seconds = models.PositiveIntegerField(default=0)
    cache_hit_billing = models.CharField(
        max_length=8, choices=CacheBilling.choices, default=CacheBilling.FREE
    )
    # What to do with a request parameter the chosen provider cannot honour.
    unsupported_params = models.CharField(
        max_length=8, choices=UnsupportedParams.choices, default=UnsupportedParams.REJECT
    )
    enabled = models.BooleanField(default=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["model_name"]
        constraints = [
            models.UniqueConstraint(
                fields=["org", "model_name"],
                condition=Q(org__isnull=False),
                name="route_unique_name_per_org",
            ),
            models.UniqueConstraint(
                fields=["model_name"],
                condition=Q(org__isnull=True),
                name="route_unique_global_name",
            ),
            models.CheckConstraint(
                condition=Q(variant_percent__lte=100) & Q(shadow_percent__lte=100),
                name="route_percentages_at_most_100",
            ),
        ]

    def __str__(self) -> str:
        owner = self.org.slug if self.org_id else "global"
        return f"{self.model_name} ({owner})"

    def clean(self) -> None:
        fallbacks = self.fallback_models
        if not isinstance(fallbacks, list) or not all(
            isinstance(name, str) and name for name in fallbacks
        ):
            raise ValidationError({"fallback_models": "Give a list of model names."})
        if self.model_name in fallbacks:
            raise ValidationError({"fallback_models": "A route cannot fall back to itself."})
        if self.max_attempts < 1:
            raise ValidationError({"max_attempts": "At least one attempt."})
