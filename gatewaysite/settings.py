"""Tollgate settings, read from the environment.

With no DATABASE_URL and no REDIS_URL set, Tollgate runs as the embedded default:
SQLite, in-process counters, queue and channel layer, one process. Setting them
switches the same code to PostgreSQL and Redis.
"""

import base64
import binascii
import hashlib
from pathlib import Path

import dj_database_url
from celery.schedules import crontab
from django.core.exceptions import ImproperlyConfigured
from redis.connection import parse_url as redis_url_parse

from gatewaysite.env import env_bool, env_float, env_int, env_list, env_networks, env_str

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = Path(env_str("TOLLGATE_VAR_DIR", str(BASE_DIR / "var")))

# ---------------------------------------------------------------- Core

DATABASE_URL = env_str("DATABASE_URL")
REDIS_URL = env_str("REDIS_URL")

# The embedded default is a local, single-user setup, so it starts in DEBUG;
# anything pointed at a real database must opt in to DEBUG explicitly.
DEBUG = env_bool("DEBUG", default=not DATABASE_URL)

_INSECURE_DEV_SECRET_KEY = "django-insecure-tollgate-local-development-only"
SECRET_KEY = env_str("SECRET_KEY") or (_INSECURE_DEV_SECRET_KEY if DEBUG else "")

# Fernet keys (urlsafe base64 of 32 bytes), newest first: the first encrypts,
# every key decrypts, so an old key keeps working until rotation is done.
TOLLGATE_ENCRYPTION_KEYS = env_list("TOLLGATE_ENCRYPTION_KEYS")
if not TOLLGATE_ENCRYPTION_KEYS and DEBUG:
    _dev_key = hashlib.sha256(f"tollgate-dev-encryption:{SECRET_KEY}".encode()).digest()
    TOLLGATE_ENCRYPTION_KEYS = [base64.urlsafe_b64encode(_dev_key).decode()]


def _insecure_settings() -> list[str]:
    """What keeps a DEBUG-off process from starting safely, in plain words."""
    problems = []
    if not SECRET_KEY:
        problems.append("SECRET_KEY is not set (use a long random string).")
    elif SECRET_KEY.startswith("django-insecure"):
        problems.append("SECRET_KEY is the insecure development default.")
    if not TOLLGATE_ENCRYPTION_KEYS:
        problems.append(
            "TOLLGATE_ENCRYPTION_KEYS is not set (comma-separated Fernet keys; "
            "make one with: python -c 'from cryptography.fernet import Fernet; "
            "print(Fernet.generate_key().decode())')."
        )
    for position, key in enumerate(TOLLGATE_ENCRYPTION_KEYS, start=1):
        try:
            valid = len(base64.urlsafe_b64decode(key.encode())) == 32
        except (binascii.Error, ValueError):
            valid = False
        if not valid:
            problems.append(f"TOLLGATE_ENCRYPTION_KEYS entry {position} is not a Fernet key.")
    return problems


if not DEBUG and (_problems := _insecure_settings()):
    raise ImproperlyConfigured(
        "Tollgate refuses to start with DEBUG off on insecure defaults:\n  - "
        + "\n  - ".join(_problems)
    )

ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", ["127.0.0.1", "localhost", "[::1]"] if DEBUG else [])
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS")

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "django_filters",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "channels",
    "django_ratelimit",
    "tenants",
    "billing",
    "routing",
    "dashboard",
    "gatewaysite",
]

# Kept short on purpose: every MiddlewareMixin hook is a thread hop under ASGI.
# The /v1/ proxy never passes through this list (see gatewaysite/asgi.py).
MIDDLEWARE = [
    # First, so its latency covers the rest; one `tollgate.access` line per request.
    "gatewaysite.logging.access_log_middleware",
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    # Turns django-ratelimit's refusals (sign-in attempts) into 429 (RATELIMIT_VIEW).
    "django_ratelimit.middleware.RatelimitMiddleware",
]

ROOT_URLCONF = "gatewaysite.urls"
ASGI_APPLICATION = "gatewaysite.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = VAR_DIR / "static"
STATIC_ROOT.mkdir(parents=True, exist_ok=True)  # WhiteNoise scans it at start-up
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedStaticFilesStorage"},
}
WHITENOISE_USE_FINDERS = DEBUG

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
LOGIN_URL = "dashboard:sign_in"
LOGIN_REDIRECT_URL = "dashboard:overview"
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": f"django.contrib.auth.password_validation.{name}"}
    for name in (
        "UserAttributeSimilarityValidator",
        "MinimumLengthValidator",
        "CommonPasswordValidator",
        "NumericPasswordValidator",
    )
]

SESSION_COOKIE_HTTPONLY = True
SESSION_COOKIE_SAMESITE = "Lax"
SESSION_COOKIE_SECURE = env_bool("SESSION_COOKIE_SECURE", default=not DEBUG)
CSRF_COOKIE_SECURE = env_bool("CSRF_COOKIE_SECURE", default=not DEBUG)
SECURE_CONTENT_TYPE_NOSNIFF = True
X_FRAME_OPTIONS = "DENY"

# ---------------------------------------------------------------- Database

if DATABASE_URL:
    DATABASES = {"default": dj_database_url.parse(DATABASE_URL, conn_max_age=0)}
    if DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql":
        # Persistent connections and ASGI do not mix; psycopg's pool does.
        DATABASES["default"].setdefault("OPTIONS", {})["pool"] = {
            "min_size": 1,
            "max_size": env_int("TOLLGATE_DB_POOL_SIZE", 10, minimum=1),
            "timeout": 10,
        }
else:
    VAR_DIR.mkdir(parents=True, exist_ok=True)
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": env_str("TOLLGATE_SQLITE_PATH", str(VAR_DIR / "tollgate.sqlite3")),
            # Web, worker and management commands share the file: WAL lets
            # readers run beside the writer, IMMEDIATE avoids upgrade deadlocks.
            "OPTIONS": {
                "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
                "transaction_mode": "IMMEDIATE",
                "timeout": 30,
            },
            # A file, not :memory:, so a server started by the tests sees the data.
            "TEST": {"NAME": str(VAR_DIR / "test-tollgate.sqlite3")},
        }
    }

# ---------------------------------------------------------------- Redis and cache

if REDIS_URL:
    CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": REDIS_URL,
            "KEY_PREFIX": "tollgate",
        }
    }
else:
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}
# Per process, so a deploy never serves the previous code's OpenAPI schema.
CACHES["schema"] = {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}

RATELIMIT_USE_CACHE = "default"
RATELIMIT_VIEW = "gatewaysite.views.rate_limited"
# Management API calls per user (or client address before sign-in).
TOLLGATE_API_RATE_LIMIT = env_str("TOLLGATE_API_RATE_LIMIT", "600/m")

# The management API (/api/v1/): see tenants/api/base.py for who may call what.
REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "tenants.api.authentication.APITokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_PAGINATION_CLASS": "tenants.api.pagination.ListPagination",
    "DEFAULT_FILTER_BACKENDS": [
        "django_filters.rest_framework.DjangoFilterBackend",
        "rest_framework.filters.OrderingFilter",
    ],
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "DEFAULT_PARSER_CLASSES": ["tenants.api.parsers.StrictJSONParser"],
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "EXCEPTION_HANDLER": "tenants.api.errors.api_exception_handler",
    "UNAUTHENTICATED_USER": None,
}
SPECTACULAR_SETTINGS = {
    "TITLE": "Tollgate management API",
    "DESCRIPTION": (
        "Teams, members, virtual keys, budgets, providers, deployments, routes, usage, "
        "cost reports, statements and the audit log of one organization. Authenticate "
        "with an API token (`Authorization: Bearer tgm_...`) created under Settings in "
        "the dashboard. Objects of other organizations answer 404. Changes accept "
        "`If-Match` with the ETag of your last read, and answer 412 if someone changed "
        "the object since."
    ),
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "SERVE_PERMISSIONS": ["rest_framework.permissions.AllowAny"],
    "SERVE_AUTHENTICATION": [],
    "SCHEMA_PATH_PREFIX": r"/api/v1",
    "COMPONENT_SPLIT_REQUEST": True,
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    "ENUM_NAME_OVERRIDES": {"ProviderKindEnum": "routing.models.Provider.Kind"},
    "POSTPROCESSING_HOOKS": [
        "drf_spectacular.hooks.postprocess_schema_enums",
        "gatewaysite.openapi.key_info_path_add",
        "gatewaysite.openapi.error_responses_add",
    ],
}
# Django's own RedisCache increments atomically, which is all django-ratelimit
# needs; in the embedded default one process owns the local-memory cache.
SILENCED_SYSTEM_CHECKS = ["django_ratelimit.W001"] + (
    [] if REDIS_URL else ["django_ratelimit.E003"]
)

# ---------------------------------------------------------------- Celery

CELERY_BROKER_URL = REDIS_URL or "memory://"
CELERY_RESULT_BACKEND = None
# Without a broker, background work runs in-process, right away.
CELERY_TASK_ALWAYS_EAGER = not REDIS_URL
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TIMEZONE = "UTC"
# With Redis, the proxy appends usage events to this stream; a drain task,
# started by beat every TOLLGATE_USAGE_DRAIN_SECONDS and reading for as long,
# writes them to the ledger. Entries a crashed worker held unacknowledged are
# taken over once idle for TOLLGATE_USAGE_CLAIM_IDLE_SECONDS (longer than any
# batch write).
TOLLGATE_USAGE_STREAM = env_str("TOLLGATE_USAGE_STREAM", "tollgate:usage")
TOLLGATE_USAGE_DRAIN_SECONDS = env_float("TOLLGATE_USAGE_DRAIN_SECONDS", 2.0, minimum=0.1)
TOLLGATE_USAGE_CLAIM_IDLE_SECONDS = env_float(
    "TOLLGATE_USAGE_CLAIM_IDLE_SECONDS", 60.0, minimum=0.1
)
CELERY_BEAT_SCHEDULE: dict[str, dict[str, object]] = {}
if REDIS_URL:
    CELERY_BEAT_SCHEDULE["drain-usage-events"] = {
        "task": "billing.tasks.drain_usage_events",
        "schedule": TOLLGATE_USAGE_DRAIN_SECONDS,
        # Runs queued while no worker was up are dropped, not replayed in a burst.
        "options": {"expires": TOLLGATE_USAGE_DRAIN_SECONDS * 5},
    }

# Rollups (billing/rollup_tasks.py): rebuild buckets with new events every
# minute, check them against the raw events daily, prune old raw events daily.
CELERY_IMPORTS = ["billing.rollup_tasks", "billing.statement_tasks", "billing.budget_tasks"]
TOLLGATE_ROLLUP_SECONDS = env_float("TOLLGATE_ROLLUP_SECONDS", 60.0, minimum=1.0)
# How often counters are checked against the ledger (seeded, or raised if behind).
TOLLGATE_BUDGET_RECONCILE_SECONDS = env_float(
    "TOLLGATE_BUDGET_RECONCILE_SECONDS", 300.0, minimum=1.0
)
if REDIS_URL:
    # Budget counters live in Redis: seed the missing, raise those behind the ledger.
    CELERY_BEAT_SCHEDULE["budget-counters-reconcile"] = {
        "task": "billing.budget_counters_reconcile",
        "schedule": TOLLGATE_BUDGET_RECONCILE_SECONDS,
        "options": {"expires": TOLLGATE_BUDGET_RECONCILE_SECONDS * 0.9},
    }
CELERY_BEAT_SCHEDULE["rollups-refresh"] = {
    "task": "billing.rollups_refresh",
    "schedule": TOLLGATE_ROLLUP_SECONDS,
    "options": {"expires": TOLLGATE_ROLLUP_SECONDS * 0.9},
}
CELERY_BEAT_SCHEDULE["rollups-reconcile"] = {
    "task": "billing.rollups_reconcile",
    "schedule": crontab(hour="0", minute="30"),
}
# Months close TOLLGATE_STATEMENT_GRACE_HOURS after they end in each org's time
# zone; checked hourly because orgs' months end at different instants.
CELERY_BEAT_SCHEDULE["statements-close-due"] = {
    "task": "billing.statements_close_due",
    "schedule": crontab(minute="5"),
}
CELERY_BEAT_SCHEDULE["usage-events-prune"] = {
    "task": "billing.usage_events_prune",
    "schedule": crontab(hour="1", minute="15"),
}

# ---------------------------------------------------------------- Channels

if REDIS_URL:
    # Pub/sub channels belong to the whole Redis server, not to a database: the prefix
    # keeps deployments on different databases of one server from hearing each other.
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.pubsub.RedisPubSubChannelLayer",
            "CONFIG": {
                "hosts": [REDIS_URL],
                "prefix": f"tollgate:db{redis_url_parse(REDIS_URL).get('db', 0)}",
            },
        }
    }
else:
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}

# ---------------------------------------------------------------- Gateway

# Largest request body the proxy accepts; bigger bodies get 413 before they are read.
TOLLGATE_MAX_REQUEST_BYTES = env_int("TOLLGATE_MAX_REQUEST_BYTES", 10 * 1024 * 1024, minimum=1024)
# A provider's answer, or one event of its stream, larger than this is refused (502)
# while it is read, never buffered whole: a broken or hostile upstream cannot exhaust memory.
TOLLGATE_MAX_UPSTREAM_RESPONSE_BYTES = env_int(
    "TOLLGATE_MAX_UPSTREAM_RESPONSE_BYTES", 32 * 1024 * 1024, minimum=1024
)
# Provider base URLs entered in the dashboard may point at loopback, private,
# link-local or reserved addresses (a local vLLM or Ollama) only when this is on;
# on by default in the embedded default (DEBUG), off in production.
TOLLGATE_PROVIDER_ALLOW_PRIVATE_NETWORKS = env_bool(
    "TOLLGATE_PROVIDER_ALLOW_PRIVATE_NETWORKS", default=DEBUG
)
# Or only these networks (CIDRs, comma-separated: "10.0.0.12/32,fd12::/64"). Both are
# checked when a base URL is saved and on the address of every upstream connection
# (routing/providers/egress.py); metadata services (169.254.169.254...) only when listed.
TOLLGATE_PROVIDER_ALLOWED_NETWORKS = env_networks("TOLLGATE_PROVIDER_ALLOWED_NETWORKS")
# How often each process checks whether keys, routes or prices changed.
TOLLGATE_CONFIG_POLL_SECONDS = env_float("TOLLGATE_CONFIG_POLL_SECONDS", 1.0, minimum=0.01)
# Usage events are written in batches off the request path.
TOLLGATE_USAGE_FLUSH_SECONDS = env_float("TOLLGATE_USAGE_FLUSH_SECONDS", 0.5, minimum=0.01)
TOLLGATE_USAGE_BATCH_SIZE = env_int("TOLLGATE_USAGE_BATCH_SIZE", 500, minimum=1)
# A web process silent this long is taken for dead, and the usage events of the requests
# it was serving are written for it (billing/inflight.py).
TOLLGATE_PROCESS_LIVE_SECONDS = env_float("TOLLGATE_PROCESS_LIVE_SECONDS", 30.0, minimum=1.0)
TOLLGATE_UPSTREAM_MAX_CONNECTIONS = env_int("TOLLGATE_UPSTREAM_MAX_CONNECTIONS", 1000, minimum=1)
# Redis connections per web process (counters, cache, health); requests queue for one.
TOLLGATE_REDIS_MAX_CONNECTIONS = env_int("TOLLGATE_REDIS_MAX_CONNECTIONS", 64, minimum=1)
# A Redis command unanswered this long fails (budgets then fail closed unless
# TOLLGATE_LIMITS_FAIL_OPEN) and its connection is reopened.
TOLLGATE_REDIS_TIMEOUT_SECONDS = env_float("TOLLGATE_REDIS_TIMEOUT_SECONDS", 2.0, minimum=0.05)
# Circuit breakers per deployment (shared through Redis when REDIS_URL is set).
TOLLGATE_BREAKER_FAILURES = env_int("TOLLGATE_BREAKER_FAILURES", 5, minimum=1)
TOLLGATE_BREAKER_COOLDOWN_SECONDS = env_float(
    "TOLLGATE_BREAKER_COOLDOWN_SECONDS", 30.0, minimum=0.1
)
# Raw usage events older than this are deleted (rollups are kept forever).
TOLLGATE_USAGE_RETENTION_DAYS = env_int("TOLLGATE_USAGE_RETENTION_DAYS", 400, minimum=1)
# Request and response bodies, kept only for orgs that turn body logging on: each cut
# to this many bytes, and deleted after this many days (never after their events).
TOLLGATE_BODY_LOG_MAX_BYTES = env_int("TOLLGATE_BODY_LOG_MAX_BYTES", 32 * 1024, minimum=0)
TOLLGATE_BODY_LOG_RETENTION_DAYS = env_int("TOLLGATE_BODY_LOG_RETENTION_DAYS", 30, minimum=1)
# A month's statement closes this long after the month ends (events still in flight);
# later events of that month appear as adjustments on the next statement.
TOLLGATE_STATEMENT_GRACE_HOURS = env_int("TOLLGATE_STATEMENT_GRACE_HOURS", 6, minimum=0)
# Budgets and rate limits (billing/budget_counters.py). A request under a hard
# budget that sets no output limit gets its route's, else this one, sent upstream.
TOLLGATE_DEFAULT_MAX_OUTPUT_TOKENS = env_int("TOLLGATE_DEFAULT_MAX_OUTPUT_TOKENS", 4096, minimum=1)
# When the counters (Redis) cannot be reached: refuse requests of keys with
# budgets or rate limits (503), or let them through unchecked.
TOLLGATE_LIMITS_FAIL_OPEN = env_bool("TOLLGATE_LIMITS_FAIL_OPEN", False)
# With Redis: each web process admits a busy key's requests from a lease of budget
# room and rate units it holds in Redis, without a round trip (billing/budget_leases.py).
TOLLGATE_BUDGET_LEASES = env_bool("TOLLGATE_BUDGET_LEASES", True)
# How fast least-latency routing forgets old measurements.
TOLLGATE_LATENCY_HALF_LIFE_SECONDS = env_float(
    "TOLLGATE_LATENCY_HALF_LIFE_SECONDS", 60.0, minimum=0.1
)
# Readiness (/readyz, gatewaysite/health.py): how long each dependency check may take,
# and how far usage ingestion may fall behind before it reports "degraded".
TOLLGATE_HEALTH_TIMEOUT_SECONDS = env_float("TOLLGATE_HEALTH_TIMEOUT_SECONDS", 1.0, minimum=0.05)
TOLLGATE_HEALTH_USAGE_LAG_SECONDS = env_float(
    "TOLLGATE_HEALTH_USAGE_LAG_SECONDS", 30.0, minimum=0.1
)

# ---------------------------------------------------------------- Alerts

# Budget thresholds, exhausted budgets and spend spikes (billing/alerts.py), sent
# to each org's AlertChannels (signed webhooks, e-mail) by Celery with retries.
from gatewaysite.env import env_decimal  # noqa: E402 (kept inside this block)

TOLLGATE_ALERT_CHECK_SECONDS = env_float("TOLLGATE_ALERT_CHECK_SECONDS", 15.0, minimum=1.0)
TOLLGATE_ALERT_MAX_ATTEMPTS = env_int("TOLLGATE_ALERT_MAX_ATTEMPTS", 8, minimum=1)
# Delay before the 2nd attempt; each later one waits twice as long (at most an hour).
TOLLGATE_ALERT_RETRY_BASE_SECONDS = env_float(
    "TOLLGATE_ALERT_RETRY_BASE_SECONDS", 30.0, minimum=0.01
)
# A spike: the last 60 minutes cost at least MULTIPLIER x the mean hour of the
# previous 7 days, and at least MIN_USD. Decimals, never floats, for money.
TOLLGATE_SPIKE_MULTIPLIER = env_decimal("TOLLGATE_SPIKE_MULTIPLIER", "3", minimum="1")
TOLLGATE_SPIKE_MIN_USD = env_decimal("TOLLGATE_SPIKE_MIN_USD", "1", minimum="0")
# Webhooks to loopback, private, link-local or reserved addresses are refused
# (server-side request forgery) unless this is on (local receivers, tests).
TOLLGATE_WEBHOOK_ALLOW_PRIVATE_NETWORKS = env_bool(
    "TOLLGATE_WEBHOOK_ALLOW_PRIVATE_NETWORKS", default=False
)
EMAIL_BACKEND = env_str("EMAIL_BACKEND", "django.core.mail.backends.console.EmailBackend")
EMAIL_FILE_PATH = env_str("EMAIL_FILE_PATH", str(VAR_DIR / "mail"))
EMAIL_HOST = env_str("EMAIL_HOST", "localhost")
EMAIL_PORT = env_int("EMAIL_PORT", 25, minimum=1)
EMAIL_HOST_USER = env_str("EMAIL_HOST_USER")
EMAIL_HOST_PASSWORD = env_str("EMAIL_HOST_PASSWORD")
EMAIL_USE_TLS = env_bool("EMAIL_USE_TLS", default=False)
EMAIL_TIMEOUT = env_int("EMAIL_TIMEOUT", 10, minimum=1)
DEFAULT_FROM_EMAIL = env_str("DEFAULT_FROM_EMAIL", "Tollgate <tollgate@localhost>")
CELERY_IMPORTS.append("billing.alert_tasks")
if REDIS_URL:
    # Reads the budget counters in Redis; the embedded default has no beat.
    CELERY_BEAT_SCHEDULE["budget-alerts-check"] = {
        "task": "billing.budget_alerts_check",
        "schedule": TOLLGATE_ALERT_CHECK_SECONDS,
        "options": {"expires": TOLLGATE_ALERT_CHECK_SECONDS * 0.9},
    }
CELERY_BEAT_SCHEDULE["spend-spikes-check"] = {
    "task": "billing.spend_spikes_check",
    "schedule": 300.0,
    "options": {"expires": 270.0},
}
CELERY_BEAT_SCHEDULE["alert-deliveries-sweep"] = {
    "task": "billing.alert_deliveries_sweep",
    "schedule": 60.0,
    "options": {"expires": 54.0},
}

# ---------------------------------------------------------------- Logging

# LOG_FORMAT=json: every log line is one JSON object (gatewaysite/logging.py), tracebacks
# included as a field; plain: "time level logger: message".
LOG_LEVEL = env_str("LOG_LEVEL", "INFO").upper()
LOG_FORMAT = env_str("LOG_FORMAT", "plain").strip().lower()
if LOG_FORMAT not in ("plain", "json"):
    raise ImproperlyConfigured(f"LOG_FORMAT must be plain or json, got {LOG_FORMAT!r}.")
# One line per request on the `tollgate.access` logger (/v1 and Django), whatever LOG_LEVEL.
TOLLGATE_ACCESS_LOG = env_bool("TOLLGATE_ACCESS_LOG", default=True)
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "plain": {
            "()": "gatewaysite.logging.PlainFormatter",
            "format": "%(asctime)s %(levelname)s %(name)s: %(message)s",
        },
        "json": {"()": "gatewaysite.logging.JsonFormatter"},
    },
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": LOG_FORMAT}},
    "root": {"handlers": ["console"], "level": LOG_LEVEL},
    "loggers": {
        # Off means a level nothing is logged at: the proxy then skips building the line.
        "tollgate.access": {
            "handlers": ["console"],
            "level": "INFO" if TOLLGATE_ACCESS_LOG else "CRITICAL",
            "propagate": False,
        },
        # uvicorn's own lines (start-up, errors) in the same format; its access log,
        # which `tollgate.access` replaces, off.
        **(
            {
                "uvicorn": {"handlers": ["console"], "level": LOG_LEVEL, "propagate": False},
                "uvicorn.access": {"handlers": [], "level": "WARNING", "propagate": False},
            }
            if LOG_FORMAT == "json"
            else {}
        ),
    },
}
# Celery keeps the configuration above instead of its own plain handler.
CELERY_WORKER_HIJACK_ROOT_LOGGER = LOG_FORMAT != "json"

# ---------------------------------------------------------------- Metrics

# /metrics (gatewaysite/metrics.py), Prometheus text format. A scrape must come from one
# of these networks and, when a token is set, present it as "Authorization: Bearer
# <token>"; a scrape relayed by a proxy (X-Forwarded-For...) needs the token.
TOLLGATE_METRICS_TOKEN = env_str("TOLLGATE_METRICS_TOKEN")
if TOLLGATE_METRICS_TOKEN and len(TOLLGATE_METRICS_TOKEN) < 16:
    raise ImproperlyConfigured("TOLLGATE_METRICS_TOKEN must be at least 16 characters long.")
TOLLGATE_METRICS_ALLOW_NETWORKS = env_networks(
    "TOLLGATE_METRICS_ALLOW_NETWORKS", ["127.0.0.0/8", "::1/128"]
)
# With several web workers, each writes its counters here every FLUSH_SECONDS and a
# scrape sums them (bin/run-process web sets and clears it). Unset: one process's own.
TOLLGATE_METRICS_DIR = env_str("TOLLGATE_METRICS_DIR")
TOLLGATE_METRICS_FLUSH_SECONDS = env_float("TOLLGATE_METRICS_FLUSH_SECONDS", 1.0, minimum=0.05)
# Spend, budget and queue gauges are read from the database and Redis at most this often.
TOLLGATE_METRICS_CACHE_SECONDS = env_float("TOLLGATE_METRICS_CACHE_SECONDS", 10.0, minimum=0.0)

# ---------------------------------------------------------------- HTTPS (production)
# With DEBUG off Tollgate assumes HTTPS in front (TLS at nginx or a load balancer):
# Django-served pages (dashboard, admin, management API) answer plain HTTP from other
# machines with a redirect to https, browsers are told to use HTTPS only (HSTS), and
# cookies are Secure (Core, above). Requests from or to loopback are not redirected
# (gatewaysite/security.py): `make run`, `make stack` on 127.0.0.1 and the tests' live
# servers need no TLS. /v1 and the probes are served before Django: never redirected.
# `manage.py check --deploy --fail-level WARNING` is clean once SECURE_HSTS_PRELOAD is
# decided (tests/gatewaysite/test_deploy_check.py).
TOLLGATE_SSL_REDIRECT = env_bool("SECURE_SSL_REDIRECT", default=not DEBUG)
# Django's own redirect stays off: it would redirect loopback too. Ours stands in for
# it, so its deploy check (security.W008) is silenced only while ours is on.
SECURE_SSL_REDIRECT = False
MIDDLEWARE.insert(
    MIDDLEWARE.index("django.middleware.security.SecurityMiddleware") + 1,
    "gatewaysite.security.https_redirect_middleware",
)
if TOLLGATE_SSL_REDIRECT:
    SILENCED_SYSTEM_CHECKS.append("security.W008")
SECURE_HSTS_SECONDS = env_int("SECURE_HSTS_SECONDS", 0 if DEBUG else 31_536_000, minimum=0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = env_bool("SECURE_HSTS_INCLUDE_SUBDOMAINS", default=not DEBUG)
# Asks browsers to hard-code HTTPS for the domain once it is submitted to their preload
# lists: hard to undo, so an explicit choice.
SECURE_HSTS_PRELOAD = env_bool("SECURE_HSTS_PRELOAD", default=False)
# uvicorn already applies X-Forwarded-Proto from the proxies in FORWARDED_ALLOW_IPS (the
# documented nginx setup). Turn this on only when replicas are reachable through the
# proxy alone and its addresses cannot be listed: Django then trusts the header from anyone.
if env_bool("TOLLGATE_TRUST_X_FORWARDED_PROTO", default=False):
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
# Invitation e-mails carry a sign-up link (a secret): the console backend would write
# it to the log. With DEBUG off and no EMAIL_BACKEND chosen, mail goes to files under
# EMAIL_FILE_PATH instead; set EMAIL_BACKEND (smtp) and EMAIL_HOST... to send it.
if not DEBUG and not env_str("EMAIL_BACKEND"):
    EMAIL_BACKEND = "django.core.mail.backends.filebased.EmailBackend"
