"""Secrets and prompts never reach a log, the audit log, an error body or a database column.

A production-like deployment (PostgreSQL half: `bin/run-stack` with web workers, Celery
worker and beat; embedded half: one server) logs JSON at DEBUG. Secrets of every kind
are made through the dashboard and the management API, traffic runs through its error
paths, then every log line, audit entry, error body and stored value is searched.
"""

import re
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest
from django.apps import apps
from django.conf import settings
from django.db import models

from billing.models import UsageEvent
from tenants.keys import generate_key, hash_key
from tenants.models import APIToken, AuditLog, Membership, Organization, VirtualKey
from tests.factories import UserFactory
from tests.support.gateway import GatewayServer, wait_for_config, wait_until
from tests.support.observability import logged_gateway, logged_stack
from tests.support.processes import mock_provider

UPSTREAM_SECRET = "sk-upstream-redaction-7c41e9a0"
REFUSED_SECRET = "sk-refused-provider-key-51d2b8"
OWNER_PASSWORD = "owner-Passphrase-redaction-3e8f"
WRONG_PASSWORD = "wrong-Passphrase-redaction-94ab"
INVITEE_PASSWORD = "invitee-Passphrase-redaction-0d6c"
PROMPT = "redaction prompt 5b1f never logged"
FOREIGN_KEY = "sk-proj-not-a-tollgate-key-88e1d0c4"
SERVER_ENV = {
    "LOG_FORMAT": "json",
    "LOG_LEVEL": "DEBUG",
    # Plain HTTP to a test server: cookies must not be Secure-only for httpx to send them.
    "SESSION_COOKIE_SECURE": "false",
    "CSRF_COOKIE_SECURE": "false",
    "TOLLGATE_PROVIDER_ALLOW_PRIVATE_NETWORKS": "true",
    # Production settings in both halves (the embedded half's own run has DEBUG on).
    "DEBUG": "false",
    "SECRET_KEY": "redaction-test-secret-key-0123456789abcdefghijklmnopqrstuvwxyz",
    "TOLLGATE_ENCRYPTION_KEYS": "dGVzdC1vbmx5LWZlcm5ldC1rZXktMDEyMzQ1Njc4OWE=",
    "ALLOWED_HOSTS": "127.0.0.1,localhost",
}


@contextmanager
def deployment(tmp_path: Path, log_path: Path) -> Iterator[GatewayServer]:
    env = {**SERVER_ENV, "EMAIL_FILE_PATH": str(tmp_path / "mail")}
    if settings.REDIS_URL:
        small = {"WEB_WORKERS": "1", "WORKER_CONCURRENCY": "1"}  # quicker to start
        with logged_stack(tmp_path / "var", log_path, **env, **small) as server:
            yield server
    else:
        with logged_gateway(log_path, **env) as server:
            yield server


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])  # closed again: deliveries are refused


def form_post(client: httpx.Client, path: str, data: dict[str, str]) -> httpx.Response:
    """POST a dashboard form the way a browser does: GET it for the CSRF cookie first."""
    client.get(path)
    return client.post(path, data={**data, "csrfmiddlewaretoken": client.cookies["csrftoken"]})


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_no_secret_or_prompt_reaches_logs_audit_errors_or_columns(
    tmp_path: Path, org: Organization
) -> None:
    owner = UserFactory(username="olive", password=OWNER_PASSWORD)
    Membership.objects.create(user=owner, org=org, role=Membership.Role.OWNER)
    secrets: dict[str, str] = {
        "upstream key": UPSTREAM_SECRET,
        "refused provider key": REFUSED_SECRET,
        "owner password": OWNER_PASSWORD,
        "wrong password": WRONG_PASSWORD,
        "invitee password": INVITEE_PASSWORD,
        "foreign key": FOREIGN_KEY,
        "unknown virtual key": generate_key().plaintext,
    }
    errors: list[str] = []
    log_path = tmp_path / "server.log"
    with (
        mock_provider(require_key=UPSTREAM_SECRET) as upstream,
        deployment(tmp_path, log_path) as server,
        httpx.Client(base_url=server.base_url, timeout=30) as browser,
    ):
        # The dashboard: a failed sign-in, a sign-in, an API token shown once.
        sign_in = "/dashboard/sign-in/"
        failed = form_post(browser, sign_in, {"username": "olive", "password": WRONG_PASSWORD})
        assert failed.status_code == 200 and "olive" in failed.text
        errors.append(failed.text)
        signed_in = form_post(browser, sign_in, {"username": "olive", "password": OWNER_PASSWORD})
        assert signed_in.status_code == 302, signed_in.text
        created = form_post(
            browser,
            f"/dashboard/settings/api-tokens/?org={org.slug}",
            {"name": "ops", "role": "admin", "lifetime": "30"},
        )
        assert created.status_code == 200, created.text
        secrets["api token"] = token = re.findall(
            r"tgm_[0-9A-Za-z]{8}_[0-9A-Za-z]{44}", created.text
        )[0]

        # The management API: a provider credential, keys, webhook secrets, an invitation.
        api = httpx.Client(
            base_url=f"{server.base_url}/api/v1",
            headers={"authorization": f"Bearer {token}"},
            timeout=30,
        )
        refused = api.post(
            "/providers/", json={"name": "", "kind": "mock", "api_key": REFUSED_SECRET}
        )
        assert refused.status_code == 400
        errors.append(refused.text)
        provider = api.post(
            "/providers/",
            json={"name": "Mock", "kind": "mock", "base_url": upstream, "api_key": UPSTREAM_SECRET},
        ).json()
        flaky, steady, garbled = (
            api.post(
                "/deployments/",
                json={
                    "provider": provider["id"],
                    "name": name,
                    "upstream_model": model,
                    "priority": rank,
                },
            ).json()["id"]
            for name, model, rank in (
                ("flaky", "m+fault=500", 0), ("steady", "m", 1), ("garbled", "m+fault=malformed", 0)
            )
        )  # fmt: skip
        routes = (("chat", [flaky, steady]), ("down", [flaky]), ("garbled", [garbled]))
        for model, deployments in routes:
            route = api.post(
                "/routes/",
                json={"model_name": model, "strategy": "priority", "deployments": deployments},
            )
            assert route.status_code == 201, route.text
        first = api.post("/keys/", json={"name": "first"}).json()
        secrets["first key"] = first["key"]
        secrets["second key"] = api.post("/keys/", json={"name": "second"}).json()["key"]
        rotated = api.post(f"/keys/{first['id']}/rotate/")
        secrets["rotated key"] = key = rotated.json()["key"]
        hook = f"http://127.0.0.1:{closed_port()}/hook"
        channel = api.post("/alert-channels/", json={"name": "ops", "kind": "webhook", "url": hook})
        assert channel.status_code == 201, channel.text
        secrets["webhook secret"] = channel.json()["signing_secret"]
        channel_id = channel.json()["id"]
        again = api.post(f"/alert-channels/{channel_id}/rotate-secret/")
        secrets["rotated webhook secret"] = again.json()["signing_secret"]
        tested = api.post(f"/alert-channels/{channel_id}/test/")  # refused: an error path
        assert tested.json()["delivered"] is False
        errors.append(tested.text)
        invitation = api.post(
            "/invitations/", json={"email": "ivy@example.com", "role": "finance"}
        ).json()
        secrets["invitation token"] = invitation["accept_url"].rstrip("/").rsplit("/", 1)[1]
        with httpx.Client(base_url=server.base_url, timeout=30) as invitee:
            joined = form_post(
                invitee,
                invitation["accept_url"].removeprefix(server.base_url),
                {"username": "ivy", "password1": INVITEE_PASSWORD, "password2": INVITEE_PASSWORD},
            )
            assert joined.status_code == 302, joined.text
        api.close()

        # The proxy: a failover, a stream, an upstream failure, bad keys, bad bodies.
        wait_for_config(server, key, "chat")
        with openai.OpenAI(base_url=server.v1, api_key=key, max_retries=0) as client:
            messages = [{"role": "user", "content": PROMPT}]
            raw = client.chat.completions.with_raw_response.create(model="chat", messages=messages)
            assert raw.headers["x-tollgate-deployment"] == "steady"
            assert int(raw.headers["x-tollgate-attempts"]) >= 2
            stream = client.chat.completions.create(model="chat", messages=messages, stream=True)
            assert "".join(
                chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices
            )
            for broken in ("down", "garbled"):
                with pytest.raises(openai.APIStatusError) as failed_upstream:
                    client.chat.completions.create(model=broken, messages=messages)
                assert failed_upstream.value.status_code == 502
                errors.append(failed_upstream.value.response.text)
        for wrong in (secrets["unknown virtual key"], FOREIGN_KEY, secrets["first key"]):
            with openai.OpenAI(base_url=server.v1, api_key=wrong, max_retries=0) as client:
                with pytest.raises(openai.AuthenticationError) as refused_key:
                    client.chat.completions.create(model="chat", messages=messages)
                errors.append(refused_key.value.response.text)
        auth = {"authorization": f"Bearer {key}"}
        for body in (
            orjson.dumps({"model": "chat", "messages": PROMPT}),
            b'{"model": "chat", "messages": [{"role": "user", "content": "' + PROMPT.encode(),
        ):
            bad = httpx.post(f"{server.v1}/chat/completions", content=body, headers=auth)
            assert bad.status_code == 400
            errors.append(bad.text)

        # Usage ingestion (the Celery worker, with Redis) logs too.
        wait_until(lambda: UsageEvent.objects.count() >= 3, timeout_s=30, what="usage events")

    # The invitation was e-mailed (to a file: never to the log, with DEBUG off).
    mail = "".join(path.read_text() for path in (tmp_path / "mail").iterdir())
    assert secrets["invitation token"] in mail
    log = log_path.read_text(errors="replace")
    lines = [orjson.loads(line) for line in log.splitlines() if line.startswith("{")]
    assert any(line["level"] == "debug" for line in lines), "DEBUG lines were expected"
    assert sum(line["logger"] == "tollgate.access" for line in lines) >= 10
    audit = orjson.dumps(list(AuditLog.objects.values("before", "after"))).decode()
    assert "provider.create" in orjson.dumps(list(AuditLog.objects.values("action"))).decode()
    stored = stored_text()
    for name, secret in {**secrets, "prompt": PROMPT}.items():
        assert secret not in log, f"the {name} is in the server log"
        assert secret not in audit, f"the {name} is in the audit log"
        for body in errors:
            assert secret not in body, f"the {name} is in an error body: {body[:300]}"
        assert secret not in stored, f"the {name} is stored in plaintext"

    # Virtual keys and API tokens are kept as hashes (compared with hmac.compare_digest).
    assert VirtualKey.objects.filter(secret_hash=hash_key(secrets["rotated key"])).exists()
    assert APIToken.objects.filter(secret_hash=hash_key(token)).exists()


def stored_text() -> str:
    """Every text, JSON and binary value in every table, as one string."""
    kinds = (models.CharField, models.TextField, models.JSONField, models.BinaryField)
    chunks: list[Any] = []
    for model in apps.get_models():
        fields = [f.attname for f in model._meta.concrete_fields if isinstance(f, kinds)]
        if fields:
            chunks.extend(model._base_manager.values_list(*fields))
    return orjson.dumps(chunks, default=str).decode()
