"""Settings come from the environment; insecure production settings refuse to start."""

import asyncio
import json
import os
import subprocess
import sys

import pytest
from channels_redis.pubsub import RedisPubSubChannelLayer

from tests.support.processes import REPO_ROOT

FERNET_KEY = "dGVzdC1vbmx5LWZlcm5ldC1rZXktMDEyMzQ1Njc4OWE="
SECURE = {
    "DEBUG": "false",
    "SECRET_KEY": "a-long-random-production-secret-key-0123456789",
    "TOLLGATE_ENCRYPTION_KEYS": FERNET_KEY,
    "DATABASE_URL": "postgres://postgres@127.0.0.1:5432/test",
}
SHOW = """
import json, django
django.setup()
from django.conf import settings as s
print(json.dumps({
    "debug": s.DEBUG,
    "engine": s.DATABASES["default"]["ENGINE"],
    "pool": bool(s.DATABASES["default"].get("OPTIONS", {}).get("pool")),
    "cache": s.CACHES["default"]["BACKEND"],
    "channels": s.CHANNEL_LAYERS["default"]["BACKEND"],
    "broker": s.CELERY_BROKER_URL,
    "eager": s.CELERY_TASK_ALWAYS_EAGER,
}))
"""


def start_django(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    clean = {
        name: value
        for name, value in os.environ.items()
        if name not in {"DEBUG", "SECRET_KEY", "TOLLGATE_ENCRYPTION_KEYS", "DATABASE_URL",
                        "REDIS_URL", "ALLOWED_HOSTS"}
    }  # fmt: skip
    return subprocess.run(
        [sys.executable, "-c", SHOW],
        env={**clean, "DJANGO_SETTINGS_MODULE": "gatewaysite.settings", **env},
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=False,
    )


def test_no_environment_means_the_embedded_default() -> None:
    result = start_django({})
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {
        "debug": True,
        "engine": "django.db.backends.sqlite3",
        "pool": False,
        "cache": "django.core.cache.backends.locmem.LocMemCache",
        "channels": "channels.layers.InMemoryChannelLayer",
        "broker": "memory://",
        "eager": True,
    }


def test_database_and_redis_urls_switch_to_the_production_services() -> None:
    result = start_django({**SECURE, "REDIS_URL": "redis://127.0.0.1:6379/3"})
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {
        "debug": False,
        "engine": "django.db.backends.postgresql",
        "pool": True,
        "cache": "django.core.cache.backends.redis.RedisCache",
        "channels": "channels_redis.pubsub.RedisPubSubChannelLayer",
        "broker": "redis://127.0.0.1:6379/3",
        "eager": False,
    }


@pytest.mark.parametrize(
    ("override", "complaint"),
    [
        ({"SECRET_KEY": ""}, "SECRET_KEY is not set"),
        ({"SECRET_KEY": "django-insecure-tollgate-local-development-only"}, "insecure development"),
        ({"TOLLGATE_ENCRYPTION_KEYS": ""}, "TOLLGATE_ENCRYPTION_KEYS is not set"),
        ({"TOLLGATE_ENCRYPTION_KEYS": "not-a-fernet-key"}, "entry 1 is not a Fernet key"),
    ],
)
def test_debug_off_refuses_to_start_on_insecure_defaults(
    override: dict[str, str], complaint: str
) -> None:
    result = start_django({**SECURE, **override})
    assert result.returncode != 0
    assert "refuses to start with DEBUG off" in result.stderr
    assert complaint in result.stderr


def test_a_bad_boolean_is_a_clear_error() -> None:
    result = start_django({"DEBUG": "maybe"})
    assert result.returncode != 0
    assert "DEBUG must be true or false" in result.stderr


@pytest.mark.skipif(not os.environ.get("REDIS_URL"), reason="needs Redis (the embedded run)")
def test_live_updates_stay_within_their_redis_database() -> None:
    """Pub/sub ignores Redis databases: two deployments sharing a server on databases 3
    and 4 must not receive each other's live usage (org ids repeat across them)."""
    shown = "import django, json; django.setup(); from django.conf import settings as s; "
    shown += "print(json.dumps(s.CHANNEL_LAYERS['default']['CONFIG']))"

    def layer_config(db: int) -> dict[str, object]:
        env = {**SECURE, "REDIS_URL": f"redis://127.0.0.1:6379/{db}"}
        result = subprocess.run(
            [sys.executable, "-c", shown], env={**os.environ, **env}, cwd=REPO_ROOT,
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        return json.loads(result.stdout)

    async def heard(config_sent: dict, config_listening: dict) -> bool:
        sender = RedisPubSubChannelLayer(**config_sent)
        listener = RedisPubSubChannelLayer(**config_listening)
        inbox = await listener.new_channel()
        await listener.group_add("usage-org-1", inbox)
        await sender.group_send("usage-org-1", {"type": "live.usage", "requests": []})
        try:
            await asyncio.wait_for(listener.receive(inbox), timeout=0.5)
        except TimeoutError:
            return False
        finally:
            await listener.flush()
            await sender.flush()
        return True

    three, four = layer_config(3), layer_config(4)
    assert asyncio.run(heard(three, layer_config(3)))
    assert not asyncio.run(heard(three, four))
