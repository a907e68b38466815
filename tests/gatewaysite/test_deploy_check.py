"""Production settings pass Django's deployment checks, and plain HTTP is sent to HTTPS."""

import os
import secrets
import subprocess
import sys

import httpx
import pytest

from tests.support.gateway import gateway_server
from tests.support.processes import REPO_ROOT

PUBLIC_HOST = "tollgate.example.com"
PRODUCTION = {
    "DEBUG": "false",
    "SECRET_KEY": secrets.token_urlsafe(50),
    "TOLLGATE_ENCRYPTION_KEYS": "dGVzdC1vbmx5LWZlcm5ldC1rZXktMDEyMzQ1Njc4OWE=",
    # Never connected to: the deployment checks read settings only.
    "DATABASE_URL": "postgres://tollgate@db.invalid:5432/tollgate",
    "REDIS_URL": "redis://redis.invalid:6379/0",
    "ALLOWED_HOSTS": PUBLIC_HOST,
    "CSRF_TRUSTED_ORIGINS": f"https://{PUBLIC_HOST}",
    "SECURE_HSTS_PRELOAD": "true",
}
# Whatever the test run itself was started with must not leak into the checked process.
_SETTINGS_VARIABLES = {
    *PRODUCTION,
    "SECURE_SSL_REDIRECT", "SECURE_HSTS_SECONDS", "SECURE_HSTS_INCLUDE_SUBDOMAINS",
    "SESSION_COOKIE_SECURE", "CSRF_COOKIE_SECURE", "TOLLGATE_TRUST_X_FORWARDED_PROTO",
}  # fmt: skip


def deploy_check(**overrides: str) -> subprocess.CompletedProcess[str]:
    """`manage.py check --deploy --fail-level WARNING` with the production environment."""
    env = {name: value for name, value in os.environ.items() if name not in _SETTINGS_VARIABLES}
    env.update({**PRODUCTION, **overrides})
    return subprocess.run(
        [sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def test_production_settings_pass_the_deployment_checks() -> None:
    result = deploy_check()
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "System check identified no issues" in output
    assert "WARNING" not in output and "security." not in output


def test_weakening_a_production_default_is_reported() -> None:
    # Preload lists are hard to leave: the operator opts in, and is reminded to. Turning
    # the redirect off is reported: its check is silenced only while Tollgate's is on.
    result = deploy_check(SECURE_HSTS_PRELOAD="", SECURE_SSL_REDIRECT="false")
    assert result.returncode != 0
    assert "security.W021" in result.stderr and "security.W008" in result.stderr
    assert "identified 2 issues" in result.stderr


@pytest.mark.django_db
def test_plain_http_from_the_network_is_redirected_and_loopback_is_not() -> None:
    hosts = f"{PUBLIC_HOST},127.0.0.1,localhost"
    with gateway_server(
        SECURE_SSL_REDIRECT="true", SECURE_HSTS_SECONDS="3600", ALLOWED_HOSTS=hosts
    ) as server:
        # What nginx forwards (uvicorn trusts it from 127.0.0.1, FORWARDED_ALLOW_IPS).
        network = {"host": PUBLIC_HOST, "x-forwarded-for": "203.0.113.9"}
        plain = httpx.get(
            f"{server.base_url}/dashboard/?org=a", headers={**network, "x-forwarded-proto": "http"}
        )
        assert plain.status_code == 301
        assert plain.headers["location"] == f"https://{PUBLIC_HOST}/dashboard/?org=a"
        api = httpx.post(f"{server.base_url}/api/v1/teams/", headers=network, json={})
        assert api.status_code == 301

        tls = httpx.get(
            f"{server.base_url}/dashboard/", headers={**network, "x-forwarded-proto": "https"}
        )
        assert tls.status_code == 302 and tls.headers["location"].startswith("/dashboard/sign-in")
        assert tls.headers["strict-transport-security"].startswith("max-age=3600")

        # The proxy and the probes are not Django's: never redirected.
        assert httpx.get(f"{server.v1}/models", headers=network).status_code == 401
        assert httpx.get(f"{server.base_url}/healthz", headers=network).status_code == 200
        # On the machine itself (local tools, `make stack`), plain HTTP is served.
        assert httpx.get(f"{server.base_url}/dashboard/").status_code == 302
        local_name = {"host": "localhost", "x-forwarded-for": "203.0.113.9"}
        assert httpx.get(f"{server.base_url}/dashboard/", headers=local_name).status_code == 302
