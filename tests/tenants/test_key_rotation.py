"""Rotating TOLLGATE_ENCRYPTION_KEYS: re-encrypt every secret, check, drop the old key."""

import os
import subprocess
import sys

import httpx
import openai
import pytest
from cryptography.fernet import Fernet, InvalidToken
from django.urls import reverse

from billing.models import AlertChannel
from routing.models import Provider
from tenants.models import AuditLog, Organization
from tests.conftest import IssueKey, MakeRoute
from tests.support.dashboard import signed_in_as
from tests.support.gateway import database_env, gateway_server, wait_for_config
from tests.support.processes import REPO_ROOT, mock_provider

K1 = Fernet.generate_key().decode()
K2 = Fernet.generate_key().decode()
UPSTREAM_SECRET = "sk-rotation-upstream-secret-4d1c"
WEBHOOK_SECRET = "whsec_rotation-signing-secret-9e2b"


def manage(*args: str, keys: str) -> subprocess.CompletedProcess[str]:
    """`manage.py ARGS` as an operator runs it, with TOLLGATE_ENCRYPTION_KEYS=`keys`."""
    env = {**os.environ, **database_env(), "TOLLGATE_ENCRYPTION_KEYS": keys}
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def under(key: str, ciphertext: str) -> bool:
    try:
        Fernet(key.encode()).decrypt(ciphertext.encode())
    except InvalidToken:
        return False
    return True


def stored() -> list[str]:
    return [
        *Provider.objects.values_list("api_key_encrypted", flat=True),
        *AlertChannel.objects.values_list("secret_encrypted", flat=True),
    ]


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_rotation_moves_every_secret_to_the_new_key_while_the_gateway_keeps_working(
    settings, org: Organization, make_route: MakeRoute, issue_key: IssueKey
) -> None:
    settings.TOLLGATE_ENCRYPTION_KEYS = [K1]
    with mock_provider(require_key=UPSTREAM_SECRET) as upstream:
        route = make_route(model="rotating", org=org, base_url=upstream)
        provider = route.deployments.get().provider
        provider.set_api_key(UPSTREAM_SECRET)
        provider.save()
        make_route(model="spare", org=org, base_url=upstream)  # a second provider: 2 batches
        channel = AlertChannel(org=org, name="hook", kind="webhook", url="https://hooks.test/")
        channel.set_secret(WEBHOOK_SECRET)
        channel.save()
        key = issue_key(org)
        assert all(under(K1, value) and not under(K2, value) for value in stored())

        # New key first, old key still listed: nothing is under the new one yet.
        pending = manage("rotate_encryption_key", "--check", keys=f"{K2},{K1}")
        assert pending.returncode == 1
        assert "3 value(s) are not under the primary key" in pending.stderr

        rotated = manage("rotate_encryption_key", "--batch-size", "1", keys=f"{K2},{K1}")
        assert rotated.returncode == 0, rotated.stderr
        assert "routing.provider.api_key_encrypted: 0 under the primary key, 2 re-encrypted" in (
            rotated.stdout
        )
        assert "billing.alertchannel.secret_encrypted: 0 under" in rotated.stdout
        assert all(under(K2, value) and not under(K1, value) for value in stored())
        entry = AuditLog.objects.get(action="encryption_key.rotate")
        assert entry.actor_label == "cli" and entry.org is None
        output = rotated.stdout + rotated.stderr + str(entry.after)
        for secret in (UPSTREAM_SECRET, WEBHOOK_SECRET, K1, K2):
            assert secret not in output

        clean = manage("rotate_encryption_key", "--check", keys=f"{K2},{K1}")
        assert clean.returncode == 0, clean.stderr
        assert "older keys can be removed" in clean.stdout
        # Idempotent: a second run changes nothing.
        before = stored()
        again = manage("rotate_encryption_key", keys=f"{K2},{K1}")
        assert again.returncode == 0 and "0 re-encrypted" in again.stdout
        assert stored() == before

        # The old key removed: the gateway still sends the right credential upstream.
        with gateway_server(TOLLGATE_ENCRYPTION_KEYS=K2) as gateway:
            wait_for_config(gateway, key, "rotating")
            client = openai.OpenAI(base_url=gateway.v1, api_key=key, max_retries=0)
            reply = client.chat.completions.create(
                model="rotating", messages=[{"role": "user", "content": "hi"}]
            )
            assert reply.choices[0].message.content
        settings.TOLLGATE_ENCRYPTION_KEYS = [K2]
        channel.refresh_from_db()
        assert channel.secret() == WEBHOOK_SECRET

        # Only the old key: those secrets are unreadable, said plainly; the rest still works.
        with gateway_server(TOLLGATE_ENCRYPTION_KEYS=K1) as gateway:
            models = httpx.get(f"{gateway.v1}/models", headers={"authorization": f"Bearer {key}"})
            assert models.status_code == 200
            client = openai.OpenAI(base_url=gateway.v1, api_key=key, max_retries=0)
            with pytest.raises(openai.APIStatusError) as refused:
                client.chat.completions.create(
                    model="rotating", messages=[{"role": "user", "content": "hi"}]
                )
            assert refused.value.status_code == 503
            assert UPSTREAM_SECRET not in refused.value.response.text
        unreadable = manage("rotate_encryption_key", "--check", keys=K1)
        assert unreadable.returncode == 1
        assert "3 cannot be read with any configured key" in unreadable.stderr
        settings.TOLLGATE_ENCRYPTION_KEYS = [K1]
        admin = signed_in_as("admin", org)
        page = admin.get(f"{reverse('dashboard:providers')}?org={org.slug}")
        assert page.status_code == 200
        assert UPSTREAM_SECRET not in page.content.decode()
