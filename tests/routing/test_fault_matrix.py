"""The fault matrix, upstream half: each fault a provider can throw, through a real gateway,
the mock provider and the official SDK, under a hard budget.

Every case checks three things a user would notice: what the client gets (the backup's
answer, or the right status, code and OpenAI-shaped body; for a stream that has begun,
its chunks and then an error event), that each request lands in the ledger exactly
once with the right outcome, and that the budget counter equals the ledger (nothing
held back, nothing spent twice, nothing over the limit). docs/reliability.md tables it.
"""

from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import httpx
import openai
import pytest
from django.db import transaction
from openai import OpenAI

from billing.models import ModelPrice, UsageEvent
from routing.models import Deployment, Provider, Route
from tenants.models import Budget, Organization
from tests.conftest import IssueKey
from tests.support.gateway import (
    GatewayServer,
    gateway_server,
    wait_for_config,
    wait_for_usage_writes_to_settle,
    wait_until,
)
from tests.support.processes import free_port

pytestmark = pytest.mark.django_db(transaction=True)

HELLO = [{"role": "user", "content": "Hello"}]
# USD per million tokens: 1,000 nano-USD an input token, 10,000 an output token.
PRICE = (Decimal("1.00"), Decimal("10.00"))
UPSTREAM_SECRET = "sk-upstream-secret-for-fault-tests"
BUDGET_NANOS = 100_000_000  # $0.10: far more than a case spends, so nothing is refused
# Tight deployment timeouts, so the timeout cases take well under a second each.
FAST = {"ttft_timeout_ms": 400, "read_timeout_ms": 400, "total_timeout_ms": 1_500}


@dataclass
class Scene:
    """One org with a hard budget, a key, and the route "r" a case builds."""

    gateway: GatewayServer
    org: Organization
    key: str
    mock_url: str
    request_ids: list[str] = field(default_factory=list)

    def client(self) -> OpenAI:
        return OpenAI(base_url=self.gateway.v1, api_key=self.key, max_retries=0)

    def route(self, *deployments: tuple[str, str, dict[str, Any]], **route_fields: Any) -> None:
        """Route "r" over (name, upstream model, deployment fields); a `base_url` field
        points that deployment at another host (e.g. a closed port)."""
        # One transaction: the gateway's next snapshot has the whole route and its prices.
        with transaction.atomic():
            provider = Provider(name="mock", kind=Provider.Kind.MOCK, base_url=self.mock_url)
            provider.set_api_key(UPSTREAM_SECRET)
            provider.save()
            route = Route.objects.create(org=self.org, model_name="r", **route_fields)
            for priority, (name, upstream, fields) in enumerate(deployments):
                fields = dict(fields)
                owner = provider
                if "base_url" in fields:
                    owner = Provider.objects.create(
                        name=f"elsewhere {name}", kind=fields.pop("kind", Provider.Kind.MOCK),
                        base_url=fields.pop("base_url"),
                    )  # fmt: skip
                route.deployments.add(
                    Deployment.objects.create(
                        provider=owner, name=name, upstream_model=upstream, priority=priority,
                        **fields,
                    )
                )  # fmt: skip
                ModelPrice.objects.get_or_create(
                    provider_kind=owner.kind, model=upstream,
                    defaults={"input_usd_per_mtok": PRICE[0], "output_usd_per_mtok": PRICE[1],
                              "effective_from": datetime(2020, 1, 1, tzinfo=UTC)},
                )  # fmt: skip
        wait_for_config(self.gateway, self.key, "r")

    def events(self) -> list[UsageEvent]:
        """This scene's chat events once every request it sent is in the ledger, exactly once."""
        rows = UsageEvent.objects.filter(org=self.org, endpoint="chat.completions")
        wait_until(
            lambda: rows.count() >= len(self.request_ids),
            timeout_s=20,
            what=f"{len(self.request_ids)} usage event(s)",
        )
        wait_for_usage_writes_to_settle()
        events = list(rows)
        assert sorted(event.id.hex for event in events) == sorted(self.request_ids)
        return events

    def assert_budget_matches_ledger(self) -> None:
        """The hard budget's counter holds exactly what the ledger says was spent."""
        spent = sum(event.cost_nanos for event in self.events())
        response = httpx.get(
            f"{self.gateway.v1}/key/info", headers={"authorization": f"Bearer {self.key}"}
        )
        assert response.status_code == 200, response.text
        (budget,) = response.json()["budgets"]
        assert Decimal(budget["spent_usd"]).scaleb(9) == spent
        assert Decimal(budget["reserved_usd"]) == 0, "a hold outlived its request"
        assert spent <= BUDGET_NANOS


@pytest.fixture
def scene(gateway: GatewayServer, org: Organization, mock_url: str, live_key: IssueKey) -> Scene:
    Budget.objects.create(org=org, scope=Budget.Scope.ORG, limit_nanos=BUDGET_NANOS)
    return Scene(gateway=gateway, org=org, key=live_key(org), mock_url=mock_url)


def closed_port_url() -> str:
    """A base URL nothing listens on: connecting is refused."""
    return f"http://127.0.0.1:{free_port()}/v1"


@dataclass(frozen=True)
class Fault:
    """A provider fault that strikes before the client has been sent anything."""

    id: str
    upstream: str  # the primary's upstream model, with mock directives
    stream: bool = False
    fields: dict[str, Any] = field(default_factory=dict)
    status: int = 502
    code: str = "upstream_error"
    retry_after: str | None = None  # the Retry-After the client must get

    def primary(self) -> tuple[str, str, dict[str, Any]]:
        return ("primary", self.upstream, {**FAST, **self.fields})


BEFORE_FIRST_BYTE = [
    Fault("500", "p+fault=500"),
    Fault("429-with-retry-after", "p+fault=429+retry_after=7", status=429,
          code="upstream_rate_limited", retry_after="7"),
    # The gateway's own default: every 429 says when to retry.
    Fault("429-without-retry-after", "p+fault=429+retry_after=none", status=429,
          code="upstream_rate_limited", retry_after="1"),
    Fault("connect-refused", "p", fields={"base_url": "closed-port"},
          code="upstream_unreachable"),
    Fault("hang-before-first-byte", "p+fault=hang", stream=True, status=504,
          code="upstream_timeout"),
    Fault("hang-before-first-byte-non-streamed", "p+fault=hang", status=504,
          code="upstream_timeout"),
    Fault("malformed-json", "p+fault=malformed", code="upstream_malformed_response"),
]  # fmt: skip


def resolved(fault: Fault) -> tuple[str, str, dict[str, Any]]:
    name, upstream, fields = fault.primary()
    if fields.get("base_url") == "closed-port":
        fields = {**fields, "base_url": closed_port_url()}
    return name, upstream, fields


def ask(scene: Scene, *, stream: bool) -> tuple[httpx.Headers, str]:
    """One chat request through the SDK: the response headers and the answer text."""
    chat = scene.client().chat.completions
    if stream:
        chunks = chat.create(model="r", messages=HELLO, max_tokens=16, stream=True)
        headers = chunks.response.headers
        scene.request_ids.append(headers["x-request-id"])
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        return headers, text
    raw = chat.with_raw_response.create(model="r", messages=HELLO, max_tokens=16)
    scene.request_ids.append(raw.headers["x-request-id"])
    return raw.headers, raw.parse().choices[0].message.content or ""


@pytest.mark.parametrize("fault", BEFORE_FIRST_BYTE, ids=lambda fault: fault.id)
def test_a_fault_before_the_first_byte_fails_over_to_the_backup(scene: Scene, fault: Fault) -> None:
    scene.route(resolved(fault), ("backup", "b", FAST))
    headers, text = ask(scene, stream=fault.stream)
    assert text
    assert (headers["x-tollgate-deployment"], headers["x-tollgate-attempts"]) == ("backup", "2")
    (event,) = scene.events()
    assert (event.outcome, event.status_code, event.deployment_name) == ("success", 200, "backup")
    assert [(a["deployment_name"], a["error_class"]) for a in event.attempt_log] == [
        ("primary", fault.code), ("backup", ""),
    ]  # fmt: skip
    assert event.cost_nanos > 0
    scene.assert_budget_matches_ledger()


@pytest.mark.parametrize("fault", BEFORE_FIRST_BYTE, ids=lambda fault: fault.id)
def test_a_fault_before_the_first_byte_with_no_backup_gets_the_right_error(
    scene: Scene, fault: Fault
) -> None:
    scene.route(resolved(fault), max_attempts=1)
    with pytest.raises(openai.APIStatusError) as raised:
        ask(scene, stream=fault.stream)
    error = raised.value
    scene.request_ids.append(error.response.headers["x-request-id"])
    assert error.status_code == fault.status
    assert isinstance(
        error, openai.RateLimitError if fault.status == 429 else openai.InternalServerError
    )
    body = error.response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == fault.code
    assert error.response.headers.get("retry-after") == fault.retry_after
    for leak in (UPSTREAM_SECRET, "127.0.0.1"):
        assert leak not in error.response.text
    (event,) = scene.events()
    assert (event.outcome, event.status_code, event.error_class) == (
        "upstream_error", fault.status, fault.code,
    )  # fmt: skip
    assert (event.cost_nanos, event.is_stream) == (0, fault.stream)
    scene.assert_budget_matches_ledger()


def test_every_429_the_client_gets_says_when_to_retry(scene: Scene) -> None:
    scene.route(("primary", "p+fault=429+retry_after=none", FAST), max_attempts=1)
    with pytest.raises(openai.RateLimitError) as raised:
        ask(scene, stream=False)
    scene.request_ids.append(raised.value.response.headers["x-request-id"])
    assert raised.value.response.headers.get("retry-after", "").isdigit()


@dataclass(frozen=True)
class MidStream:
    """A fault that strikes after the stream's first chunk has reached the client."""

    id: str
    upstream: str
    code: str
    words: int  # the words that reached the client
    provider: dict[str, Any] = field(default_factory=dict)  # another provider kind


ANTHROPIC = {"kind": Provider.Kind.ANTHROPIC, "base_url": "mock-root"}
AFTER_FIRST_BYTE = [
    # Half of the 20 words arrive, then the connection is reset.
    MidStream("connection-reset", "cut+fault=reset+tokens=20", "upstream_unreachable", 10),
    # The first word, then silence longer than the read timeout.
    MidStream("slow-trickle", "slow+tokens=20+chunk_delay_ms=1500", "upstream_timeout", 1),
    # The opening event, then one that is not JSON: an OpenAI-format provider's events
    # are relayed as they are, each checked to be JSON first; a translated provider's
    # (Anthropic's) are parsed by its translator.
    MidStream("malformed-sse", "bad+fault=malformed", "upstream_malformed_response", 0),
    MidStream("malformed-sse-translated", "bad+fault=malformed", "upstream_malformed_response",
              0, provider=ANTHROPIC),
    # Half of the 20 words, then a clean end without the finish, the usage or [DONE].
    MidStream("truncated", "cut+fault=truncated+tokens=20", "upstream_malformed_response", 10),
    MidStream("truncated-translated", "cut+fault=truncated+tokens=20",
              "upstream_malformed_response", 10, provider=ANTHROPIC),
]  # fmt: skip


@pytest.mark.parametrize("fault", AFTER_FIRST_BYTE, ids=lambda fault: fault.id)
def test_a_fault_mid_stream_ends_it_with_an_error_event_and_bills_what_was_sent(
    scene: Scene, fault: MidStream
) -> None:
    # A backup exists but must not be used: the client already has the primary's bytes.
    provider = dict(fault.provider)
    if provider.get("base_url") == "mock-root":
        provider["base_url"] = scene.mock_url.removesuffix("/v1")
    scene.route(("primary", fault.upstream, {**FAST, **provider}), ("backup", "b", FAST))
    chunks = scene.client().chat.completions.create(
        model="r", messages=HELLO, max_tokens=50, stream=True
    )
    scene.request_ids.append(chunks.response.headers["x-request-id"])
    assert chunks.response.headers["x-tollgate-deployment"] == "primary"
    received = []
    with pytest.raises(openai.APIError) as raised:
        for chunk in chunks:
            received.append(chunk)
    assert received, "the chunks sent before the fault reach the client"
    assert raised.value.code == fault.code
    words = "".join(c.choices[0].delta.content or "" for c in received if c.choices).split()
    assert len(words) == fault.words
    (event,) = scene.events()
    assert (event.outcome, event.status_code, event.error_class, event.deployment_name) == (
        "upstream_error", 502 if fault.code != "upstream_timeout" else 504, fault.code, "primary",
    )  # fmt: skip
    assert event.attempts == 1
    # What was sent is billed: the words counted, or (Anthropic) the provider's own count
    # so far, which its opening event puts at one.
    assert event.output_tokens == max(fault.words, 1 if fault.provider else 0)
    assert event.cost_nanos == event.input_tokens * 1_000 + event.output_tokens * 10_000
    scene.assert_budget_matches_ledger()


def test_an_answer_that_overruns_max_tokens_is_billed_in_full_then_the_budget_blocks(
    gateway: GatewayServer, org: Organization, mock_url: str, live_key: IssueKey
) -> None:
    """A provider that ignores max_tokens: the reservation covered 10 output tokens, the
    answer has 2,000. The ledger must match the provider's invoice, so the whole answer
    is billed and the hard budget is exceeded by the overrun; the next request is refused."""
    limit = 1_000_000  # $0.001: room for the 10-token reservation, not for 2,000 tokens
    Budget.objects.create(org=org, scope=Budget.Scope.ORG, limit_nanos=limit)
    scene = Scene(gateway=gateway, org=org, key=live_key(org), mock_url=mock_url)
    scene.route(("primary", "big+tokens=2000+ignore_max_tokens=true", FAST))
    raw = scene.client().chat.completions.with_raw_response.create(
        model="r", messages=HELLO, max_tokens=10
    )
    scene.request_ids.append(raw.headers["x-request-id"])
    assert len((raw.parse().choices[0].message.content or "").split()) == 2_000
    with pytest.raises(openai.RateLimitError) as raised:
        scene.client().chat.completions.create(model="r", messages=HELLO, max_tokens=10)
    scene.request_ids.append(raised.value.response.headers["x-request-id"])
    assert raised.value.code == "budget_exceeded"
    served, refused = sorted(scene.events(), key=lambda event: event.outcome == "blocked")
    assert (served.output_tokens, served.cost_nanos) == (2_000, 4_000 + 2_000 * 10_000)
    assert (refused.outcome, refused.cost_nanos) == ("blocked", 0)
    response = httpx.get(f"{gateway.v1}/key/info", headers={"authorization": f"Bearer {scene.key}"})
    (budget,) = response.json()["budgets"]
    assert Decimal(budget["spent_usd"]).scaleb(9) == served.cost_nanos > limit


# What a bound on upstream answers would look like; the setting does not exist yet.
RESPONSE_BOUND_BYTES = 1024 * 1024


@pytest.fixture
def bounded_gateway(tmp_path: Any) -> Iterator[GatewayServer]:
    with gateway_server(
        TOLLGATE_MAX_UPSTREAM_RESPONSE_BYTES=str(RESPONSE_BOUND_BYTES),
        TOLLGATE_VAR_DIR=str(tmp_path),
    ) as server:
        yield server


def test_a_large_answer_under_the_bound_is_relayed_whole(scene: Scene) -> None:
    """A 3 MiB non-streamed answer (2 MiB of filler), under the default bound of
    TOLLGATE_MAX_UPSTREAM_RESPONSE_BYTES (32 MiB), is relayed and billed as usual."""
    scene.route(("primary", "huge+pad_bytes=3145728", FAST))
    raw = scene.client().chat.completions.with_raw_response.create(
        model="r", messages=HELLO, max_tokens=16
    )
    scene.request_ids.append(raw.headers["x-request-id"])
    assert len(raw.content) > 3 * 1024 * 1024
    (event,) = scene.events()
    assert event.outcome == "success"
    scene.assert_budget_matches_ledger()


@pytest.mark.parametrize("stream", [False, True], ids=["non-streamed", "streamed"])
def test_an_answer_over_the_response_bound_is_refused_not_buffered(
    bounded_gateway: GatewayServer, org: Organization, mock_url: str, issue_key: IssueKey,
    stream: bool,
) -> None:  # fmt: skip
    Budget.objects.create(org=org, scope=Budget.Scope.ORG, limit_nanos=BUDGET_NANOS)
    scene = Scene(gateway=bounded_gateway, org=org, key=issue_key(org), mock_url=mock_url)
    scene.route(("primary", f"huge+pad_bytes={3 * RESPONSE_BOUND_BYTES}", FAST))
    with pytest.raises(openai.APIError) as raised:
        ask(scene, stream=stream)
    assert raised.value.code == "upstream_response_too_large"
