"""Per-key IP allowlists: a key used from outside its networks gets 403 `ip_not_allowed`;
X-Forwarded-For counts only when a trusted proxy (uvicorn's FORWARDED_ALLOW_IPS) sends
it; the API, the dashboard and the services refuse networks that are not networks."""

from collections.abc import Iterator

import anthropic
import httpx
import openai
import pytest
from django.conf import settings
from django.core.exceptions import ValidationError
from openai import OpenAI

from tenants.models import AuditLog, Organization, VirtualKey
from tenants.selectors import virtual_key_contexts
from tenants.services import virtual_key_issue, virtual_key_update
from tests.conftest import TEST_ACTOR, IssueKey, MakeRoute
from tests.support.api import token_client
from tests.support.dashboard import signed_in_as
from tests.support.gateway import (
    GatewayServer,
    gateway_server,
    wait_for_usage_writes_to_settle,
    wait_until,
)

HELLO = [{"role": "user", "content": "Hello"}]
# The gateway believes X-Forwarded-For from 127.0.0.1 only; 127.0.0.2 is a client.
TRUSTED_PROXY = "127.0.0.1"
UNTRUSTED_PEER = "127.0.0.2"

live = pytest.mark.django_db(transaction=True)


@pytest.fixture(scope="module")
def ip_gateway(
    django_db_setup: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayServer]:
    with gateway_server(
        FORWARDED_ALLOW_IPS=TRUSTED_PROXY,
        TOLLGATE_VAR_DIR=str(tmp_path_factory.mktemp("ip-allowlist-var")),
    ) as server:
        yield server


@pytest.fixture
def gateway_for_test(ip_gateway: GatewayServer) -> Iterator[GatewayServer]:
    yield ip_gateway
    if not settings.REDIS_URL:  # the gateway writes its events itself: not under the flush
        wait_for_usage_writes_to_settle()


def loaded(gateway: GatewayServer, key: str) -> str:
    """`key` once the gateway knows it (401 until its snapshot has it; then 200 or 403)."""
    wait_until(
        lambda: (
            httpx.get(f"{gateway.v1}/models", headers={"authorization": f"Bearer {key}"})
            .status_code != 401
        ),
        what="the gateway to load the key",
    )  # fmt: skip
    return key


def sdk(
    gateway: GatewayServer, key: str, *, source: str = TRUSTED_PROXY, forwarded_for: str = ""
) -> OpenAI:
    """The openai SDK connecting from `source`, optionally sending X-Forwarded-For."""
    transport = httpx.HTTPTransport(local_address=source)
    return OpenAI(
        base_url=gateway.v1, api_key=key, max_retries=0, timeout=15,
        http_client=httpx.Client(transport=transport),
        default_headers={"x-forwarded-for": forwarded_for} if forwarded_for else None,
    )  # fmt: skip


def refused(client: OpenAI) -> openai.PermissionDeniedError:
    with pytest.raises(openai.PermissionDeniedError) as raised:
        client.chat.completions.create(model="chat-model", messages=HELLO)
    error = raised.value
    assert (error.status_code, error.code, error.body["type"]) == (
        403, "ip_not_allowed", "permission_error",
    )  # fmt: skip
    return error


@live
def test_a_key_works_from_its_networks_and_gets_403_elsewhere(
    gateway_for_test: GatewayServer,
    org: Organization,
    make_route: MakeRoute,
    issue_key: IssueKey,
) -> None:
    ip_gateway = gateway_for_test
    make_route(model="chat-model", org=org)
    local = loaded(ip_gateway, issue_key(org, name="local", allowed_ips=["127.0.0.1"]))
    intranet = loaded(ip_gateway, issue_key(org, name="intranet", allowed_ips=["10.0.0.0/8"]))
    anywhere = loaded(ip_gateway, issue_key(org, name="anywhere"))

    for key in (local, anywhere):
        reply = sdk(ip_gateway, key).chat.completions.create(model="chat-model", messages=HELLO)
        assert reply.choices[0].message.content
    error = refused(sdk(ip_gateway, intranet))
    assert "127.0.0.1" not in error.message
    # Every endpoint checks it, in each endpoint's own error shape.
    with pytest.raises(openai.PermissionDeniedError):
        sdk(ip_gateway, intranet).models.list()
    with pytest.raises(anthropic.PermissionDeniedError) as messages:
        anthropic.Anthropic(
            base_url=ip_gateway.base_url, api_key=intranet, max_retries=0, timeout=15
        ).messages.create(model="chat-model", max_tokens=16, messages=HELLO)  # type: ignore[arg-type]
    assert messages.value.body["error"]["type"] == "permission_error"

    # An edit takes effect within a configuration reload.
    virtual_key_update(
        key=VirtualKey.objects.get(name="intranet"), actor=TEST_ACTOR, name="intranet",
        allowed_models=[], rpm_limit=None, tpm_limit=None, expires_at=None,
        allowed_ips=["10.0.0.0/8", "127.0.0.0/8"],
    )  # fmt: skip
    wait_until(
        lambda: (
            httpx.get(f"{ip_gateway.v1}/models", headers={"authorization": f"Bearer {intranet}"})
            .status_code == 200
        ),
        what="the widened allowlist to apply",
    )  # fmt: skip


@live
def test_forwarded_for_counts_only_when_a_trusted_proxy_sends_it(
    gateway_for_test: GatewayServer,
    org: Organization,
    make_route: MakeRoute,
    issue_key: IssueKey,
) -> None:
    ip_gateway = gateway_for_test
    make_route(model="chat-model", org=org)
    intranet = loaded(ip_gateway, issue_key(org, name="intranet", allowed_ips=["10.0.0.0/8"]))
    local = loaded(ip_gateway, issue_key(org, name="local", allowed_ips=["127.0.0.1/32"]))

    # Through the trusted proxy: the client it names is the one judged.
    relayed = sdk(ip_gateway, intranet, forwarded_for="10.1.2.3")
    assert relayed.chat.completions.create(model="chat-model", messages=HELLO).choices
    refused(sdk(ip_gateway, local, forwarded_for="10.1.2.3"))
    # What a client put in front of the proxy's entry is not believed: the proxy appends
    # the address it saw, and the last untrusted entry is the client.
    refused(sdk(ip_gateway, intranet, forwarded_for="10.1.2.3, 198.51.100.7"))

    # From a peer that is no trusted proxy the header is ignored: a spoofing client
    # is judged by its own address.
    refused(sdk(ip_gateway, intranet, source=UNTRUSTED_PEER, forwarded_for="10.1.2.3"))
    refused(sdk(ip_gateway, local, source=UNTRUSTED_PEER, forwarded_for="127.0.0.1"))
    peer = loaded(ip_gateway, issue_key(org, name="peer", allowed_ips=[f"{UNTRUSTED_PEER}/32"]))
    spoofed = sdk(ip_gateway, peer, source=UNTRUSTED_PEER, forwarded_for="192.0.2.1")
    assert spoofed.chat.completions.create(model="chat-model", messages=HELLO).choices


# --- where allowlists are written: API, dashboard, services; and the snapshot


@pytest.mark.django_db
def test_the_api_normalises_allowlists_and_refuses_what_is_not_a_network(org) -> None:
    client = token_client(org)
    created = client.post(
        "/api/v1/keys/",
        {"name": "k", "allowed_ips": ["10.1.2.3/8", "2001:db8::1", "::ffff:192.0.2.1",
                                      " 10.0.0.0/8 "]},
        format="json",
    )  # fmt: skip
    assert created.status_code == 201, created.json()
    assert created.json()["allowed_ips"] == ["10.0.0.0/8", "192.0.2.1/32", "2001:db8::1/128"]
    key = VirtualKey.objects.get(pk=created.json()["id"])
    issued = AuditLog.objects.get(action="virtual_key.issue", target_id=str(key.pk))
    assert issued.after["allowed_ips"] == ["10.0.0.0/8", "192.0.2.1/32", "2001:db8::1/128"]

    for bad in (["10.0.0.0/33"], ["intranet"], ["10.0.0.0/8", ""], [7], "10.0.0.0/8",
                [f"10.0.{n // 256}.{n % 256}" for n in range(101)]):  # fmt: skip
        response = client.post("/api/v1/keys/", {"name": "x", "allowed_ips": bad}, format="json")
        assert response.status_code == 400, bad
        assert response.json()["error"]["param"].startswith("allowed_ips"), bad  # or .1
        patched = client.patch(f"/api/v1/keys/{key.pk}/", {"allowed_ips": bad}, format="json")
        assert patched.status_code == 400, bad
    assert VirtualKey.objects.filter(org=org).count() == 1
    message = client.post(
        "/api/v1/keys/", {"name": "x", "allowed_ips": ["intranet"]}, format="json"
    ).json()["error"]["message"]
    assert "not an IP address or network" in message

    patched = client.patch(
        f"/api/v1/keys/{key.pk}/", {"allowed_ips": ["203.0.113.0/24"]}, format="json"
    )
    assert patched.status_code == 200 and patched.json()["allowed_ips"] == ["203.0.113.0/24"]
    changed = AuditLog.objects.get(action="virtual_key.update", target_id=str(key.pk))
    assert changed.before == {"allowed_ips": ["10.0.0.0/8", "192.0.2.1/32", "2001:db8::1/128"]}
    assert changed.after == {"allowed_ips": ["203.0.113.0/24"]}
    # A change of something else leaves the allowlist alone; [] lifts it.
    client.patch(f"/api/v1/keys/{key.pk}/", {"name": "renamed"}, format="json")
    assert client.get(f"/api/v1/keys/{key.pk}/").json()["allowed_ips"] == ["203.0.113.0/24"]
    lifted = client.patch(f"/api/v1/keys/{key.pk}/", {"allowed_ips": []}, format="json")
    assert lifted.json()["allowed_ips"] == []


@pytest.mark.django_db
def test_the_dashboard_key_forms_validate_allowlists(org) -> None:
    admin = signed_in_as("admin", org)
    new = f"/dashboard/keys/new/?org={org.slug}"

    bad = admin.post(new, {"name": "ci", "allowed_ips": "10.0.0.0/8\n10.0.0.300"})
    assert bad.status_code == 200 and not VirtualKey.objects.exists()
    assert "“10.0.0.300” is not an IP address or network" in bad.content.decode()

    created = admin.post(new, {"name": "ci", "allowed_ips": "10.1.2.3/8, 2001:db8::/32\n"})
    assert created.status_code == 302
    key = VirtualKey.objects.get()
    assert key.allowed_ips == ["10.0.0.0/8", "2001:db8::/32"]
    detail = admin.get(f"/dashboard/keys/{key.pk}/?org={org.slug}").content.decode()
    assert "10.0.0.0/8, 2001:db8::/32" in detail

    edit = f"/dashboard/keys/{key.pk}/edit/?org={org.slug}"
    refused = admin.post(edit, {"name": "ci", "allowed_ips": "203.0.113.0/24 nonsense"})
    assert refused.status_code == 400 and "“nonsense” is not an IP address" in (
        refused.content.decode()
    )
    saved = admin.post(edit, {"name": "ci", "allowed_ips": "203.0.113.7"})
    assert saved.status_code == 302
    key.refresh_from_db()
    assert key.allowed_ips == ["203.0.113.7/32"]


@pytest.mark.django_db
def test_the_services_refuse_bad_allowlists_with_a_clear_error(org) -> None:
    with pytest.raises(ValidationError) as text:
        virtual_key_issue(org=org, name="k", actor=TEST_ACTOR, allowed_ips="10.0.0.0/8")  # type: ignore[arg-type]
    assert "list" in text.value.message_dict["allowed_ips"][0]
    with pytest.raises(ValidationError) as too_many:
        virtual_key_issue(
            org=org, name="k", actor=TEST_ACTOR,
            allowed_ips=[f"10.0.{n // 256}.{n % 256}" for n in range(101)],
        )  # fmt: skip
    assert "at most 100" in too_many.value.message_dict["allowed_ips"][0]
    assert not VirtualKey.objects.exists()


@pytest.mark.django_db
def test_the_snapshot_fails_closed_on_a_stored_entry_that_is_not_a_network(org) -> None:
    """A row written around the services must not turn into "any address"."""
    open_key = virtual_key_issue(org=org, name="open", actor=TEST_ACTOR).key
    broken = virtual_key_issue(org=org, name="broken", actor=TEST_ACTOR).key
    VirtualKey.objects.filter(pk=broken.pk).update(allowed_ips=["intranet"])
    mixed = virtual_key_issue(org=org, name="mixed", actor=TEST_ACTOR).key
    VirtualKey.objects.filter(pk=mixed.pk).update(allowed_ips=["intranet", "10.0.0.0/8"])

    contexts = {context.key_id: context for context in virtual_key_contexts()}

    assert contexts[open_key.pk].ip_allowlist is None
    broken_list = contexts[broken.pk].ip_allowlist
    assert broken_list is not None and not broken_list.permits("10.0.0.1")
    mixed_list = contexts[mixed.pk].ip_allowlist
    assert mixed_list is not None and mixed_list.permits("10.0.0.1")
    assert mixed_list.permits("::ffff:10.0.0.1") and not mixed_list.permits("11.0.0.1")
    assert not mixed_list.permits(None)
