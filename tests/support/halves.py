"""Which half of the suite is running: PostgreSQL + Redis (production-like) or the
embedded default (SQLite, in-process); see the Makefile."""

import shutil

import pytest
from django.conf import settings


def production_half() -> bool:
    """DATABASE_URL and REDIS_URL point at PostgreSQL and Redis."""
    return bool(settings.REDIS_URL) and "postgresql" in settings.DATABASES["default"]["ENGINE"]


production_half_only = pytest.mark.skipif(
    not production_half(), reason="runs in the PostgreSQL + Redis half of the suite"
)

needs_redis_server = pytest.mark.skipif(
    shutil.which("redis-server") is None, reason="needs redis-server (a private one is started)"
)
