"""Server-side request forgery, upstream half: a provider base URL cannot make the
gateway connect into our own network, whatever was saved.

A real gateway runs with production settings (private networks refused) and only
127.0.0.2 allowed by the operator (TOLLGATE_PROVIDER_ALLOWED_NETWORKS). The mock provider
on 127.0.0.1 plays the internal service a tenant aims at; a second one on 127.0.0.2 is the
legitimate provider. Rows are written directly, around the save-time check, as a legacy
row or a name that resolves elsewhere after it was saved (DNS rebinding) would be.
"""

import ipaddress
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import transaction
from openai import OpenAI

from billing.models import ModelPrice
from routing.models import Deployment, Provider, Route
from routing.providers.egress import EgressPolicy
from routing.services import provider_base_url_check
from tenants.models import Organization
from tests.conftest import IssueKey
from tests.support.gateway import (
    GatewayServer,
    gateway_server,
    wait_for_config,
    wait_for_usage_writes_to_settle,
)
from tests.support.processes import REPO_ROOT, free_port, running_process

# The end-to-end cases: the gateway reads committed rows.
live = pytest.mark.django_db(transaction=True)
HELLO = [{"role": "user", "content": "Hello"}]
ALLOWED_HOST = "127.0.0.2"
# Short, so a connection that wrongly went out (to 169.254.169.254) fails fast.
FAST = {"connect_timeout_ms": 1_000, "ttft_timeout_ms": 2_000, "total_timeout_ms": 4_000}


class _Recorder(BaseHTTPRequestHandler):
    """Records every request. Under /redirect it answers 307 to the allowed mock;
    anything else (a request relayed as a proxy) gets a 502."""

    server: "_RecordingServer"

    def _answer(self) -> None:
        self.server.seen.append(f"{self.command} {self.path}")
        self.rfile.read(int(self.headers.get("content-length") or 0))
        if self.path.startswith("/redirect/"):
            self.send_response(307)
            self.send_header("location", self.server.redirect_to)
        else:
            self.send_response(502)
        self.send_header("content-length", "0")
        self.end_headers()

    do_GET = do_POST = do_CONNECT = _answer

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _RecordingServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, redirect_to: str) -> None:
        super().__init__((ALLOWED_HOST, 0), _Recorder)
        self.seen: list[str] = []
        self.redirect_to = redirect_to

    @property
    def url(self) -> str:
        return f"http://{ALLOWED_HOST}:{self.server_address[1]}"


@pytest.fixture(scope="module")
def allowed_mock() -> Iterator[str]:
    """The legitimate provider: a mock on 127.0.0.2, the one address the operator allows."""
    port = free_port()
    root = f"http://{ALLOWED_HOST}:{port}"
    args = [sys.executable, "-m", "routing.mockprovider", "--host", ALLOWED_HOST,
            "--port", str(port)]  # fmt: skip
    with running_process(args, ready_url=f"{root}/_mock/health", cwd=REPO_ROOT):
        yield f"{root}/v1"


@pytest.fixture(scope="module")
def recorder(allowed_mock: str) -> Iterator[_RecordingServer]:
    server = _RecordingServer(redirect_to=f"{allowed_mock}/chat/completions")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def strict_gateway(
    django_db_setup: None, recorder: _RecordingServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayServer]:
    """Production settings: private networks refused but for 127.0.0.2; and a proxy in
    the environment (the recorder) that upstream calls must not use."""
    proxy = recorder.url
    with gateway_server(
        TOLLGATE_PROVIDER_ALLOW_PRIVATE_NETWORKS="false",
        TOLLGATE_PROVIDER_ALLOWED_NETWORKS=f"{ALLOWED_HOST}/32",
        HTTP_PROXY=proxy, HTTPS_PROXY=proxy, ALL_PROXY=proxy,
        http_proxy=proxy, https_proxy=proxy, all_proxy=proxy, NO_PROXY="", no_proxy="",
        TOLLGATE_VAR_DIR=str(tmp_path_factory.mktemp("ssrf-var")),
    ) as server:  # fmt: skip
        yield server


@pytest.fixture
def strict(strict_gateway: GatewayServer, usage_written: None) -> GatewayServer:
    return strict_gateway


@pytest.fixture
def usage_written() -> Iterator[None]:
    yield
    if not settings.REDIS_URL:  # the gateway writes its events itself: not under the flush
        wait_for_usage_writes_to_settle()


def route(org: Organization, model: str, *base_urls: str) -> None:
    """Route `model` over one deployment per base URL, in that order of priority, each
    asking its provider for the upstream model "<model>-<n>" (to find it in request logs)."""
    with transaction.atomic():
        route = Route.objects.create(org=org, model_name=model)
        for priority, base_url in enumerate(base_urls):
            provider = Provider.objects.create(
                org=org, name=f"{model} {priority}", kind=Provider.Kind.MOCK, base_url=base_url
            )
            upstream = f"{model}-{priority}"
            route.deployments.add(
                Deployment.objects.create(
                    provider=provider, name=upstream, upstream_model=upstream,
                    priority=priority, **FAST,
                )
            )  # fmt: skip
            ModelPrice.objects.create(
                provider_kind=Provider.Kind.MOCK, model=upstream,
                input_usd_per_mtok=Decimal("1"), output_usd_per_mtok=Decimal("2"),
                effective_from=datetime(2020, 1, 1, tzinfo=UTC),
            )  # fmt: skip


def models_received(mock_base_url: str) -> set[str]:
    """The models a mock provider was asked for lately (its log keeps the last 200; other
    tests share the session's mock, and some of them send bodies without a model)."""
    root = mock_base_url.removesuffix("/v1")
    log = httpx.get(f"{root}/_mock/requests", params={"limit": 200}).json()
    bodies = [entry["json"] for entry in log if isinstance(entry.get("json"), dict)]
    return {body["model"] for body in bodies if "model" in body}


def sdk(gateway: GatewayServer, key: str) -> OpenAI:
    return OpenAI(base_url=gateway.v1, api_key=key, max_retries=0, timeout=20)


@live
def test_a_provider_on_our_own_network_is_refused_at_connect_time(
    strict: GatewayServer, org: Organization, issue_key: IssueKey, mock_url: str
) -> None:
    port = mock_url.removesuffix("/v1").rsplit(":", 1)[1]
    internal = [
        f"http://localhost:{port}/v1",  # a name: judged on what it resolves to
        f"http://127.0.0.1:{port}/v1",  # literal addresses never reach a resolver
        f"http://[::1]:{port}/v1",
        f"http://0.0.0.0:{port}/v1",  # Linux connects it to loopback
        f"http://[::ffff:127.0.0.1]:{port}/v1",  # IPv4-mapped
        f"http://0x7f.1:{port}/v1",  # a name to aiohttp; the resolver makes it 127.0.0.1
        f"http://2130706433:{port}/v1",  # 127.0.0.1 as one number
        "http://169.254.169.254/v1",  # cloud metadata
    ]
    key = issue_key(org)
    for number, base_url in enumerate(internal):
        route(org, f"internal-{number}", base_url)
    wait_for_config(strict, key, f"internal-{len(internal) - 1}")

    for number, base_url in enumerate(internal):
        with pytest.raises(openai.APIStatusError) as refused:
            sdk(strict, key).chat.completions.create(model=f"internal-{number}", messages=HELLO)
        error = refused.value
        assert (error.status_code, error.code) == (502, "upstream_address_forbidden"), base_url
        assert error.body["type"] == "upstream_error"
        # The client learns nothing about where the name pointed.
        assert "127.0.0.1" not in error.message and port not in error.message, base_url
    assert not models_received(mock_url) & {f"internal-{n}-0" for n in range(len(internal))}


@live
def test_failover_skips_a_refused_provider_and_the_internal_one_receives_nothing(
    strict: GatewayServer, org: Organization, issue_key: IssueKey, mock_url: str,
    allowed_mock: str,
) -> None:  # fmt: skip
    key = issue_key(org)
    route(org, "rebound", mock_url.replace("127.0.0.1", "localhost"), allowed_mock)
    wait_for_config(strict, key, "rebound")

    for stream in (False, True):
        raw = sdk(strict, key).chat.completions.with_raw_response.create(
            model="rebound", messages=HELLO, stream=stream
        )
        assert raw.headers["x-tollgate-deployment"] == "rebound-1"
        if stream:
            assert "".join(c.choices[0].delta.content or "" for c in raw.parse() if c.choices)
        else:
            assert raw.parse().choices[0].message.content
    assert "rebound-0" not in models_received(mock_url)
    assert "rebound-1" in models_received(allowed_mock)


@live
def test_redirects_are_not_followed(
    strict: GatewayServer, org: Organization, issue_key: IssueKey,
    recorder: _RecordingServer, allowed_mock: str,
) -> None:  # fmt: skip
    """The provider answers 307 to another (even an allowed) address: the client gets a
    502 and the redirect's target is never called."""
    key = issue_key(org)
    route(org, "redirected", f"{recorder.url}/redirect/v1")
    wait_for_config(strict, key, "redirected")

    with pytest.raises(openai.APIStatusError) as refused:
        sdk(strict, key).chat.completions.create(model="redirected", messages=HELLO)

    assert (refused.value.status_code, refused.value.code) == (502, "upstream_redirect")
    assert "POST /redirect/v1/chat/completions" in recorder.seen
    assert "redirected-0" not in models_received(allowed_mock)


@live
def test_a_proxy_in_the_gateways_environment_is_not_used(
    strict: GatewayServer, org: Organization, issue_key: IssueKey,
    recorder: _RecordingServer, allowed_mock: str,
) -> None:  # fmt: skip
    """HTTP_PROXY and friends point at the recorder (which answers 502): the call goes
    straight to the provider anyway."""
    key = issue_key(org)
    route(org, "direct", allowed_mock)
    wait_for_config(strict, key, "direct")
    seen_before = len(recorder.seen)

    reply = sdk(strict, key).chat.completions.create(model="direct", messages=HELLO)

    assert reply.choices[0].message.content
    assert "direct-0" in models_received(allowed_mock)
    assert recorder.seen[seen_before:] == [], "the environment's proxy was used"


# --- the policy itself, and the save-time check that shares it


@pytest.mark.parametrize(
    ("address", "allowed"),
    [
        ("8.8.8.8", True),
        ("2606:4700:4700::1111", True),
        ("127.0.0.1", False),
        ("::1", False),
        ("0.0.0.0", False),
        ("::", False),
        ("10.1.2.3", False),
        ("172.16.0.1", False),
        ("192.168.1.1", False),
        ("100.64.0.1", False),  # carrier-grade NAT
        ("169.254.169.254", False),
        ("fe80::1%eth0", False),
        ("fd00:ec2::254", False),
        ("224.0.0.1", False),
        ("240.0.0.1", False),
        ("::ffff:10.0.0.1", False),
        ("64:ff9b::a00:1", False),  # NAT64 of 10.0.0.1
        ("2002:a00:1::", False),  # 6to4 of 10.0.0.1
        ("::ffff:8.8.8.8", True),
        ("127.0.0.2", True),  # the operator's allowlist
        ("::ffff:127.0.0.2", True),
    ],
)
def test_which_addresses_upstream_connections_may_reach(address: str, allowed: bool) -> None:
    policy = EgressPolicy(allowed_networks=(ipaddress.ip_network("127.0.0.2/32"),))
    assert policy.permits(address) is allowed


def test_metadata_services_stay_refused_where_private_networks_are_allowed() -> None:
    anything_private = EgressPolicy(allow_private=True)
    assert anything_private.permits("10.0.0.1") and anything_private.permits("127.0.0.1")
    assert not anything_private.permits("169.254.169.254")
    assert not anything_private.permits("fd00:ec2::254")
    listed = EgressPolicy(allowed_networks=(ipaddress.ip_network("169.254.169.254/32"),))
    assert listed.permits("169.254.169.254")


def test_the_save_time_check_honours_the_operators_networks(settings: Any) -> None:
    settings.TOLLGATE_PROVIDER_ALLOW_PRIVATE_NETWORKS = False
    settings.TOLLGATE_PROVIDER_ALLOWED_NETWORKS = ["127.0.0.2/32", "10.0.0.0/8"]
    for allowed in ("http://127.0.0.2:9100/v1", "http://10.1.2.3/v1", "https://8.8.8.8/v1"):
        provider_base_url_check(kind=Provider.Kind.OPENAI_COMPATIBLE, base_url=allowed)
    for refused in ("http://127.0.0.1:9100/v1", "http://localhost/v1", "http://192.168.0.1/"):
        with pytest.raises(ValidationError):
            provider_base_url_check(kind=Provider.Kind.OPENAI_COMPATIBLE, base_url=refused)
    settings.TOLLGATE_PROVIDER_ALLOW_PRIVATE_NETWORKS = True
    provider_base_url_check(kind=Provider.Kind.OPENAI_COMPATIBLE, base_url="http://127.0.0.1/v1")
    with pytest.raises(ValidationError):  # metadata, unless listed
        provider_base_url_check(
            kind=Provider.Kind.OPENAI_COMPATIBLE, base_url="http://169.254.169.254/latest"
        )


def test_a_bad_allowed_network_stops_the_gateway_from_starting(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", "import django; django.setup()"],
        env={"DJANGO_SETTINGS_MODULE": "gatewaysite.settings", "PATH": "/usr/bin:/bin",
             "TOLLGATE_PROVIDER_ALLOWED_NETWORKS": "10.0.0.0/8,intranet",
             "TOLLGATE_VAR_DIR": str(tmp_path)},
        cwd=REPO_ROOT, capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip
    assert result.returncode != 0
    assert "TOLLGATE_PROVIDER_ALLOWED_NETWORKS: 'intranet' is not a network" in result.stderr
