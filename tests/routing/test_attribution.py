"""Tags and end users on requests: validated at the edge, carried into the usage event."""

import uuid
from datetime import UTC, datetime

import anthropic
import openai
import pytest
from openai import OpenAI

from billing.models import UsageEvent
from routing.errors import InvalidRequest
from routing.proxy.http import ProxyRequest
from routing.proxy.steps import Attribution, parse_attribution
from tests.conftest import IssueKey, MakeRoute
from tests.support.gateway import GatewayServer, wait_for_events

HELLO = [{"role": "user", "content": "Hello there, gateway"}]


def request_with(headers: dict[str, str]) -> ProxyRequest:
    return ProxyRequest(
        method="POST", path="/v1/chat/completions", headers=headers, body=b"{}",
        client_host=None, event_id=uuid.uuid4(), started_at=datetime.now(UTC),
        started_monotonic=0.0,
    )  # fmt: skip


# ---------------------------------------------------------------- the parsing step


@pytest.mark.parametrize(
    ("header", "tags"),
    [
        ("", ()),
        ("  ", ()),
        ("search", ("search",)),
        ("feature:search, env:prod ,team/growth", ("feature:search", "env:prod", "team/growth")),
        ("b,a,b,a", ("b", "a")),
        (",".join(f"t{i}" for i in range(10)), tuple(f"t{i}" for i in range(10))),
        ("x" * 64, ("x" * 64,)),
    ],
)
def test_valid_tags_are_kept_in_order_without_duplicates(
    header: str, tags: tuple[str, ...]
) -> None:
    assert parse_attribution(request_with({"x-tollgate-tags": header})) == Attribution(tags, "")


@pytest.mark.parametrize(
    ("header", "message"),
    [
        ("a,,b", "Invalid tag ''"),
        ("a,", "Invalid tag ''"),
        ("has space", "Invalid tag 'has space'"),
        ("emoji✓", "Invalid tag"),
        ("x" * 65, "1 to 64 characters"),
        (",".join(f"t{i}" for i in range(11)), "11 given, at most 10"),
    ],
)
def test_malformed_tags_are_refused_naming_the_header(header: str, message: str) -> None:
    with pytest.raises(InvalidRequest, match=message) as refused:
        parse_attribution(request_with({"x-tollgate-tags": header}))
    assert refused.value.param == "x-tollgate-tags"
    assert refused.value.status == 400


def test_the_end_user_header_is_checked_like_the_user_field() -> None:
    assert parse_attribution(request_with({"x-tollgate-user": " u-1 "})).end_user == "u-1"
    # Headers arrive decoded as Latin-1; clients send UTF-8.
    as_sent = ("é" * 256).encode().decode("latin-1")
    assert parse_attribution(request_with({"x-tollgate-user": as_sent})).end_user == "é" * 256
    for bad in ("u" * 257, "tab\there"):
        with pytest.raises(InvalidRequest) as refused:
            parse_attribution(request_with({"x-tollgate-user": bad}))
        assert refused.value.param == "x-tollgate-user"


# ---------------------------------------------------------------- through the gateway


def client(gateway: GatewayServer, key: str, **headers: str) -> OpenAI:
    return OpenAI(
        base_url=gateway.v1, api_key=key, max_retries=0, timeout=15, default_headers=headers
    )


def calls(org) -> list[UsageEvent]:
    return list(UsageEvent.objects.filter(org=org).exclude(endpoint="models"))


@pytest.fixture
def key(org, make_route: MakeRoute, live_key: IssueKey) -> str:
    make_route(model="chat-model")
    make_route(model="embed-model", price=("0.10", "0"))
    make_route(model="claude-ish", upstream_model="gpt-4o-mini")
    return live_key(org)


@pytest.mark.django_db(transaction=True)
def test_tags_and_user_from_the_openai_sdk_reach_the_usage_event(
    gateway: GatewayServer, org, key: str
) -> None:
    reply = client(gateway, key).chat.completions.create(
        model="chat-model", messages=HELLO, user="customer-42",
        extra_headers={"x-tollgate-tags": "feature:search,env:prod,feature:search"},
    )  # fmt: skip
    assert reply.choices[0].message.content

    (event,) = wait_for_events(UsageEvent.objects.filter(org=org, endpoint="chat.completions"), 1)
    assert event.tags == ["feature:search", "env:prod"]
    assert event.end_user == "customer-42"
    assert event.outcome == UsageEvent.Outcome.SUCCESS


@pytest.mark.django_db(transaction=True)
def test_the_user_field_wins_over_the_header_and_the_header_serves_embeddings(
    gateway: GatewayServer, org, key: str
) -> None:
    sdk = client(gateway, key, **{"x-tollgate-user": "from-header"})
    sdk.chat.completions.create(model="chat-model", messages=HELLO, user="from-body")
    sdk.embeddings.create(model="embed-model", input="hello")
    sdk.chat.completions.create(model="chat-model", messages=HELLO, stream=True).close()

    events = wait_for_events(UsageEvent.objects.filter(org=org).exclude(endpoint="models"), 3)
    by_endpoint = sorted((e.endpoint, e.is_stream, e.end_user) for e in events)
    assert by_endpoint == [
        ("chat.completions", False, "from-body"),
        ("chat.completions", True, "from-header"),
        ("embeddings", False, "from-header"),
    ]


@pytest.mark.django_db(transaction=True)
def test_the_anthropic_metadata_user_id_is_the_end_user(
    gateway: GatewayServer, org, key: str
) -> None:
    sdk = anthropic.Anthropic(base_url=gateway.base_url, api_key=key, max_retries=0, timeout=15)
    sdk.messages.create(
        model="claude-ish", max_tokens=50, messages=HELLO, metadata={"user_id": "anthropic-user"},
        extra_headers={"x-tollgate-tags": "sdk:anthropic"},
    )  # fmt: skip

    (event,) = wait_for_events(UsageEvent.objects.filter(org=org, endpoint="messages"), 1)
    assert (event.end_user, event.tags) == ("anthropic-user", ["sdk:anthropic"])


@pytest.mark.django_db(transaction=True)
def test_bad_tags_get_a_clear_400_and_the_request_is_still_metered(
    gateway: GatewayServer, org, key: str
) -> None:
    sdk = client(gateway, key)
    with pytest.raises(openai.BadRequestError) as refused:
        sdk.chat.completions.create(
            model="chat-model", messages=HELLO, extra_headers={"x-tollgate-tags": "ok,not ok"}
        )
    assert refused.value.body["param"] == "x-tollgate-tags"
    assert refused.value.body["code"] == "invalid_tags"
    assert "Invalid tag 'not ok'" in refused.value.body["message"]

    with pytest.raises(openai.BadRequestError) as too_long:
        sdk.chat.completions.create(model="chat-model", messages=HELLO, user="u" * 257)
    assert too_long.value.body["param"] == "user"

    with pytest.raises(anthropic.BadRequestError) as anthropic_refused:
        anthropic.Anthropic(base_url=gateway.base_url, api_key=key, max_retries=0).messages.create(
            model="claude-ish", max_tokens=50, messages=HELLO,
            extra_headers={"x-tollgate-tags": "a" * 65},
        )  # fmt: skip
    assert "x-tollgate-tags" in anthropic_refused.value.body["error"]["message"]

    events = wait_for_events(UsageEvent.objects.filter(org=org).exclude(endpoint="models"), 3)
    assert sorted((e.endpoint, e.status_code, e.outcome, e.error_class) for e in events) == [
        ("chat.completions", 400, "client_error", "invalid_tags"),
        ("chat.completions", 400, "client_error", "invalid_user"),
        ("messages", 400, "client_error", "invalid_tags"),
    ]
    assert all(e.tags == [] and e.cost_nanos == 0 for e in events)
